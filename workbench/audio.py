"""Audio helpers for signal workflows: read wav, mix down, resample, band-pass, cut windows, augment, NT-Xent.

Every function takes and returns numpy arrays (``augment_views`` takes torch tensors: it runs
per batch during training). Nothing here knows about a data set or a task.

>>> import numpy as np
>>> windows = frame(np.zeros(10_000, dtype=np.float32), size=4000, hop=2000)
>>> windows.shape
(4, 4000)
"""

from __future__ import annotations

import math
import os
from math import gcd
from pathlib import Path

import numpy as np

__all__ = ["read_wav", "write_wav", "to_mono", "resample", "bandpass", "frame", "frame_starts", "augment_views", "nt_xent"]

_INT_SCALE = {np.dtype("int16"): 32768.0, np.dtype("int32"): 2147483648.0, np.dtype("uint8"): 128.0}


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """The samples of a wav file as float32 in [-1, 1] (frames x channels, or 1-D for mono), and its rate.

    Read with :func:`scipy.io.wavfile.read`; integer PCM is scaled by its full range.
    """
    from scipy.io import wavfile

    try:
        rate, samples = wavfile.read(str(path))
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable wav file ({err}). Convert it to PCM wav (e.g. with sox or ffmpeg).") from err
    samples = np.asarray(samples)
    if samples.dtype == np.uint8:
        samples = samples.astype(np.float32) - 128.0
        return samples / 128.0, int(rate)
    scale = _INT_SCALE.get(samples.dtype, 1.0)
    return (samples.astype(np.float32) / scale), int(rate)


def write_wav(path: str | os.PathLike, signal: np.ndarray, rate: int) -> Path:
    """Write float samples (mono 1-D or frames x channels) as 16-bit PCM, peak-normalised to 0.9 when louder than 1."""
    from scipy.io import wavfile

    signal = np.asarray(signal, dtype=np.float64)
    peak = float(np.abs(signal).max()) if signal.size else 0.0
    if peak > 1.0:
        signal = signal * (0.9 / peak)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wavfile.write(str(path), int(rate), np.round(signal * 32767).astype(np.int16))
    return path


def to_mono(samples: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(mono signal, was it multichannel)``: the mean over channels of a frames x channels array."""
    samples = np.asarray(samples)
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False), False
    if samples.ndim != 2:
        raise ValueError(f"audio must be 1-D (mono) or frames x channels, got shape {samples.shape}.")
    return samples.mean(axis=1).astype(np.float32), samples.shape[1] > 1


def resample(signal: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample with :func:`scipy.signal.resample_poly` (polyphase, anti-aliased) by ``target/orig`` reduced."""
    from scipy.signal import resample_poly

    if orig_rate <= 0 or target_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_rate} -> {target_rate}.")
    if orig_rate == target_rate:
        return np.asarray(signal, dtype=np.float32)
    g = gcd(int(orig_rate), int(target_rate))
    return resample_poly(signal, int(target_rate) // g, int(orig_rate) // g).astype(np.float32)


def bandpass(signal: np.ndarray, rate: int, *, low: float = 25.0, high: float = 400.0, order: int = 4) -> np.ndarray:
    """Zero-phase Butterworth band-pass (``scipy.signal.sosfiltfilt``); ``high`` is capped below Nyquist."""
    from scipy.signal import butter, sosfiltfilt

    nyquist = rate / 2
    high = min(high, 0.95 * nyquist)
    if not 0 < low < high:
        raise ValueError(f"band-pass needs 0 < low < high < Nyquist ({nyquist} Hz); got low={low}, high={high}.")
    sos = butter(order, [low, high], btype="bandpass", fs=rate, output="sos")
    signal = np.asarray(signal, dtype=np.float64)
    padlen = min(3 * (2 * len(sos) + 1), max(0, len(signal) - 1))
    return sosfiltfilt(sos, signal, padlen=padlen).astype(np.float32)


def frame_starts(n: int, *, size: int, hop: int) -> np.ndarray:
    """Start positions of windows of ``size`` every ``hop`` samples; the last window ends at the signal's end."""
    if size <= 0 or hop <= 0:
        raise ValueError(f"window size and hop must be positive, got size={size}, hop={hop}.")
    if n <= size:
        return np.array([0], dtype=np.int64)
    starts = list(range(0, n - size + 1, hop))
    if starts[-1] + size < n:
        starts.append(n - size)
    return np.asarray(starts, dtype=np.int64)


def frame(signal: np.ndarray, *, size: int, hop: int) -> np.ndarray:
    """Windows ``(n_windows, size)`` with overlap ``size - hop``; a signal shorter than ``size`` is zero-padded."""
    signal = np.asarray(signal, dtype=np.float32)
    if len(signal) < size:
        signal = np.pad(signal, (0, size - len(signal)))
    starts = frame_starts(len(signal), size=size, hop=hop)
    return np.stack([signal[s:s + size] for s in starts])


def augment_views(x, *, rate: int, generator=None, gain_db: float = 6.0, noise_snr_db: tuple = (10.0, 30.0),
                  max_shift: float = 0.25, low_jitter: tuple = (20.0, 60.0), high_jitter: tuple = (250.0, 450.0)):
    """A randomly augmented copy of a batch of waveforms ``x`` (batch x samples, a torch tensor).

    Per row: a circular time shift of up to ``max_shift`` of the length, a gain of
    ``+-gain_db``, Gaussian noise at an SNR drawn from ``noise_snr_db``, and a band-pass whose
    cut-offs are drawn from ``low_jitter`` and ``high_jitter`` (applied in the frequency domain).

    Every random number is drawn on ``x``'s device (a ``generator``, when given, must be of that
    device; None draws from torch's global RNG of that device), so a batch on a GPU never waits
    for the host; the noise has ``x``'s dtype.
    """
    import torch

    b, n = x.shape
    g = generator

    def uniform(lo, hi, size=(b, 1)):
        return lo + (hi - lo) * torch.rand(size, generator=g, device=x.device)

    shifts = (uniform(-max_shift, max_shift, (b,)) * n).long()
    idx = (torch.arange(n, device=x.device).unsqueeze(0) - shifts.unsqueeze(1)) % n
    x = torch.gather(x, 1, idx)
    spec = torch.fft.rfft(x, dim=1)
    freqs = torch.fft.rfftfreq(n, d=1.0 / rate, device=x.device).unsqueeze(0)
    low, high = uniform(*low_jitter), uniform(*high_jitter)
    x = torch.fft.irfft(spec * ((freqs >= low) & (freqs <= high)), n=n, dim=1)
    power = x.pow(2).mean(dim=1, keepdim=True).clamp_min(1e-12)
    snr = 10 ** (uniform(*noise_snr_db) / 10)
    x = x + torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype) * torch.sqrt(power / snr)
    return x * 10 ** (uniform(-gain_db, gain_db) / 20)


def nt_xent(z1, z2, *, temperature: float = 0.1):
    """NT-Xent (SimCLR) loss of two views ``z1``, ``z2`` (batch x dim): row i of each is the other's positive.

    Cosine similarities over the ``2 * batch`` embeddings, divided by ``temperature``; each
    embedding's positive competes against the other ``2 * batch - 2`` in a cross-entropy.
    """
    import torch
    from torch.nn import functional as F

    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent needs two (batch, dim) views of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}.")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), -math.inf)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)

