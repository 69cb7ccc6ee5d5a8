"""Synthetic phonocardiograms with a documented ground truth (used when ``data_path`` is empty).

:func:`simulate` draws patients and their recordings; :func:`write_layout` writes them in a real layout (CirCor,
PhysioNet 2016, PASCAL) for ``data/heart_sound/`` and the tests.

Ground truth
    Revised once for issue 24 toward the CirCor DigiScope 2022 recordings, then frozen; where no source gives a
    number it is marked *assumed*. Sources: [C] the CirCor public training set (942 patients), counts of its
    ``training_data.csv`` columns (as tabulated in github.com/ash-neupane/heart-murmur, explore.ipynb; the same
    categories as [P]); [P] the PhysioNet Challenge 2022 page and its data description
    (physionetchallenges.org/2022, /2022/data), which follow Oliveira et al., "The CirCor DigiScope Dataset: From
    Murmur Detection to Murmur Classification", IEEE JBHI 26(6) 2022, doi:10.1109/JBHI.2021.3137048.
    Heart: each patient draws a heart rate U(60, 140) bpm; beat intervals vary by N(0, 4%) beat to beat.
    Systole lasts ``0.42 - 0.0015 * bpm`` s. S1 is a damped sine (decay 20 ms) at the patient's frequency
    U(35, 60) Hz, S2 one at U(50, 90) Hz (decay 15 ms, amplitude 0.7), each +-20% per beat. The auscultation
    location (AV, PV, TV, MV; two per CirCor patient) scales S1 by 0.6 / 0.6 / 0.9 / 1.0 and S2 by
    1.0 / 0.9 / 0.6 / 0.5 (all assumed, unchanged). Recordings last ``DEFAULTS["sim_seconds"]`` (CirCor's
    average 22.9 s [P], shortened for compute).
    Murmur: present in 179 / 874 = 20.5% of CirCor patients (Present 179, Absent 695 [C]; PhysioNet task: 20%).
    Systolic in 178 of 179, diastolic in 5 of 179, all early-diastolic decrescendo [C]; a diastolic murmur
    covers the first half of diastole. Systolic timing holosystolic / early / mid / late with counts
    101 / 59 / 17 / 1 [C], covering 0-1 / 0-0.5 / 0.25-0.75 / 0.5-1 of the S1-end-to-S2 interval (assumed);
    shape plateau / decrescendo / diamond / crescendo 111 / 34 / 31 / 2 [C] (timing and shape drawn
    independently: assumed, [C] gives only their counts); grade I / II / III of VI 104 / 28 / 46 [C] (III holds
    III-VI [P]; diastolic I / II / III of IV 3 / 1 / 1); pitch low / medium / high 87 / 49 / 42 [C], as
    band-limited Gaussian noise in 25-125 / 150-350 / 350-600 Hz (the usual auscultation bands; assumed, CirCor
    names the pitch only), each edge x U(0.9, 1.1) per patient. Quality (harsh 96 / blowing 78 / musical 4 [C])
    is not modelled. The murmur's peak amplitude is ``0.1 * grade`` (assumed, unchanged) at the most audible
    location, drawn PV / TV / MV / AV 62 / 56 / 42 / 19 [C], and half that elsewhere; following [P]'s grading
    rule a grade I murmur is not heard at every location (each other location hears it with p 0.5, assumed),
    grade II and up at all of them. The 25-400 Hz band-pass of ``preprocess`` keeps little of a high-pitch
    murmur, as it would of a real one.
    Noise (the kinds issue 24 names for CirCor: stethoscope rubbing, talking, crying, ambient; not found in [P],
    the paper itself was not at hand; every level and rate assumed): ambient pink (1/f) noise at the patient's signal-to-noise ratio, heart
    sounds (S1 + S2) over ambient power, N(``DEFAULTS["sim_snr_db"]``, 6 dB) per patient and x U(0.8, 1.25) in
    amplitude per recording. ``sim_snr_db`` is the one free difficulty knob: 10 dB, chosen before measuring and
    left there because the band-power baseline's murmur test AUROC over seeds 0-4 was already inside 0.70-0.90
    (0.761; benchmarks/heart_baseline_difficulty.py, issue 24). Each recording also carries, independently:
    stethoscope rubbing (p 0.5; 1-3 bursts of 0.1-0.5 s of 20-300..1000 Hz noise with a rough envelope),
    talking (p 0.3; 1-3 voiced utterances of 0.5-2 s, F0 90-220 Hz, 8 harmonics, syllables at 4-5 Hz) and
    crying (p 0.1; 1-3 cries of 0.5-1.5 s, F0 300-550 Hz with vibrato), each peaking at 1-4x (talking 0.5-2x)
    the heart sounds' RMS. Breathing is 25-150 Hz noise gated by ``sin^2`` at 12-24 breaths/min (amplitude
    U(0, 0.15)), which also modulates the heart sounds by 10%. An extrasystole (PhysioNet: 10%) makes each beat
    premature with p 0.12 (interval x0.6, then a compensatory x1.4 pause). An artifact (PASCAL) adds 3-6 bursts
    of 0.2-1 s broadband noise at 1-4x the S1 amplitude.
    Labels come from these latents: CirCor murmur is Unknown for the 68 / 942 = 7.2% of patients with the lowest
    SNR ([C]; the annotator could not tell, [P]), else Present / Absent by the murmur, even where a grade I
    murmur is not heard at the recorded locations; CirCor outcome is Abnormal with probability
    ``0.2 + 0.2 * grade`` (grade 0 without murmur), so it is noisy by design; PhysioNet is abnormal with a
    murmur or an extrasystole; PASCAL draws its class with p 0.4 / 0.25 / 0.15 / 0.2 and sets the latent to
    match. Every recording comes with its true S1/systole/S2/diastole segmentation.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ... import audio
from .settings import DEFAULTS, LOCATIONS, TASKS, check_task

__all__ = ["simulate", "write_layout"]

# Murmur properties of the CirCor DigiScope 2022 public training set (942 patients; the counts of its
# training_data.csv). The module docstring says where each number comes from.
#: Share of patients with a murmur, among those whose murmur status is known (Present 179, Absent 695).
MURMUR_SHARE = 179 / (179 + 695)
#: Share of patients whose murmur status is Unknown (68 of 942): the patients with the lowest SNR.
UNKNOWN_SHARE = 68 / 942
#: Systolic murmurs: 178 of the 179 murmur patients; diastolic (all early-diastolic decrescendo): 5 of 179.
SYSTOLIC_SHARE, DIASTOLIC_SHARE = 178 / 179, 5 / 179
SYSTOLIC_TIMING = {"holosystolic": 101, "early": 59, "mid": 17, "late": 1}
SYSTOLIC_SHAPE = {"plateau": 111, "decrescendo": 34, "diamond": 31, "crescendo": 2}
SYSTOLIC_GRADE = {1: 104, 2: 28, 3: 46}  # I/VI, II/VI, III/VI (III/VI holds III-VI)
DIASTOLIC_GRADE = {1: 3, 2: 1, 3: 1}  # I/IV, II/IV, III/IV
PITCH = {"low": 87, "medium": 49, "high": 42}
MOST_AUDIBLE = {"PV": 62, "TV": 56, "MV": 42, "AV": 19}
# Assumed (CirCor names these categories but gives no numbers for them):
#: Pitch bands (Hz) of the usual auscultation convention.
PITCH_BANDS = {"low": (25.0, 125.0), "medium": (150.0, 350.0), "high": (350.0, 600.0)}
#: Part of systole (0 = end of S1, 1 = start of S2) each timing covers.
TIMING_SPAN = {"holosystolic": (0.0, 1.0), "early": (0.0, 0.5), "mid": (0.25, 0.75), "late": (0.5, 1.0)}
#: Spread (dB) of the patients' SNR around ``DEFAULTS["sim_snr_db"]``.
SNR_SPREAD_DB = 6.0
#: Noise events per recording: (probability that the kind occurs, events when it does, amplitude range relative to
#: the RMS of the recording's heart sounds, duration range in s).
NOISE_EVENTS = {"rubbing": (0.5, (1, 3), (1.0, 4.0), (0.1, 0.5)),
                "talking": (0.3, (1, 3), (0.5, 2.0), (0.5, 2.0)),
                "crying": (0.1, (1, 3), (1.0, 4.0), (0.5, 1.5))}


def _draw(rng, counts: Mapping):
    """One key of ``counts``, drawn with probability proportional to its count."""
    keys = list(counts)
    weights = np.array([counts[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=weights / weights.sum()))]


def _unknown_below(snr_db: float) -> float:
    """The SNR (dB) under which a CirCor patient's murmur status is Unknown: the ``UNKNOWN_SHARE`` quantile."""
    from scipy.stats import norm

    return snr_db + SNR_SPREAD_DB * float(norm.ppf(UNKNOWN_SHARE))


def _damped(rate: int, freq: float, decay: float, seconds: float = 0.12) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.exp(-t / decay) * np.sin(2 * np.pi * freq * t) * (1 - np.exp(-t / 0.003))


def _band_noise(rng, n: int, rate: int, low: float, high: float) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    high = min(high, 0.45 * rate)
    sos = butter(4, [low, high], btype="bandpass", fs=rate, output="sos")
    x = sosfilt(sos, rng.normal(size=n))
    return x / (x.std() + 1e-12)


def _add(x: np.ndarray, start: int, piece: np.ndarray) -> None:
    if start >= len(x):
        return
    end = min(len(x), start + len(piece))
    x[start:end] += piece[:end - start]


def _pink_noise(rng, n: int, rate: int) -> np.ndarray:
    """Unit-variance noise with power falling as 1/f above 20 Hz (room ambience)."""
    spectrum = np.fft.rfft(rng.normal(size=n))
    f = np.fft.rfftfreq(n, 1 / rate)
    spectrum /= np.sqrt(np.maximum(f, 20.0))
    x = np.fft.irfft(spectrum, n)
    return x / (x.std() + 1e-12)


def _harmonic(rng, n: int, rate: int, f0: float, harmonics: int, *, vibrato: float) -> np.ndarray:
    """A voiced sound: harmonics of a slowly gliding ``f0`` with amplitudes 1/k, peak-normalised."""
    t = np.arange(n) / rate
    glide = f0 * (1 + 0.15 * np.sin(np.pi * t / t[-1]) + vibrato * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(glide) / rate
    x = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, harmonics + 1))
    return x / np.abs(x).max()


def _noise_event(rng, kind: str, n: int, rate: int) -> np.ndarray:
    """One noise event of ``kind`` (rubbing, talking, crying), peak about 1."""
    if kind == "rubbing":  # stethoscope friction: broadband bursts, rough envelope
        rough = np.abs(_band_noise(rng, n, rate, 2.0, 30.0))
        return _band_noise(rng, n, rate, 20.0, rng.uniform(300, 1000)) * rough / 3 * np.hanning(n)
    if kind == "talking":  # voiced speech of an adult nearby: F0 90-220 Hz, syllables at 4-5 Hz
        syllables = np.sin(np.pi * rng.uniform(4, 5) * np.arange(n) / rate + rng.uniform(0, np.pi)) ** 2
        return _harmonic(rng, n, rate, rng.uniform(90, 220), 8, vibrato=0.02) * syllables * np.hanning(n)
    # crying: a child's cry, F0 300-550 Hz with vibrato
    return _harmonic(rng, n, rate, rng.uniform(300, 550), 4, vibrato=0.04) * np.hanning(n)


def _shape(shape: str, n: int) -> np.ndarray:
    """A murmur's intensity over its ``n`` samples: plateau, crescendo, decrescendo or diamond; peak 1."""
    u = np.linspace(0, 1, n)
    if shape == "crescendo":
        return u
    if shape == "decrescendo":
        return 1 - u
    if shape == "diamond":
        return 1 - np.abs(2 * u - 1)
    return np.minimum(1, np.minimum(u, 1 - u) / 0.1)  # plateau, 10% ramps at each end


def _patient(rng, task: str, snr_db: float) -> dict:
    """A patient's latent state (see the module docstring)."""
    p = {"bpm": rng.uniform(60, 140), "f1": rng.uniform(35, 60), "f2": rng.uniform(50, 90),
         "snr_db": float(rng.normal(snr_db, SNR_SPREAD_DB)), "unknown": False, "murmur": "", "grade": 0,
         "timing": "", "shape": "", "pitch": "", "heard": (), "extrasystole": False, "artifact": False,
         "loudest": _draw(rng, MOST_AUDIBLE), "breath_rate": rng.uniform(12, 24) / 60,
         "breath_amp": rng.uniform(0, 0.15)}
    p["unknown"] = task.startswith("circor") and p["snr_db"] < _unknown_below(snr_db)
    if task == "pascal":
        p["pascal"] = str(rng.choice(TASKS["pascal"].classes, p=[0.4, 0.25, 0.15, 0.2]))
        has_murmur, p["extrasystole"], p["artifact"] = p["pascal"] == "murmur", p["pascal"] == "extrasystole", p["pascal"] == "artifact"
    else:
        has_murmur = rng.random() < (MURMUR_SHARE if task.startswith("circor") else 0.2)
        p["extrasystole"] = task == "physionet2016" and rng.random() < 0.1
    if has_murmur:
        diastolic = rng.random() < DIASTOLIC_SHARE
        systolic = rng.random() < SYSTOLIC_SHARE or not diastolic
        p["murmur"] = "both" if systolic and diastolic else ("systolic" if systolic else "diastolic")
        p["grade"] = _draw(rng, SYSTOLIC_GRADE if systolic else DIASTOLIC_GRADE)
        p["timing"], p["shape"] = _draw(rng, SYSTOLIC_TIMING), _draw(rng, SYSTOLIC_SHAPE)
        p["pitch"] = _draw(rng, PITCH)
        lo, hi = PITCH_BANDS[p["pitch"]]
        p["band"] = (lo * rng.uniform(0.9, 1.1), hi * rng.uniform(0.9, 1.1))
        # grade I: not heard at every location; grade II and up: at every location
        p["heard"] = tuple(loc for loc in LOCATIONS if loc == p["loudest"] or p["grade"] > 1 or rng.random() < 0.5)
    p["abnormal"] = bool(rng.random() < 0.2 + 0.2 * p["grade"])
    return p


def _label(p: dict, task: str) -> str:
    if task == "circor_murmur":
        return "Unknown" if p["unknown"] else ("Present" if p["murmur"] else "Absent")
    if task == "circor_outcome":
        return "Abnormal" if p["abnormal"] else "Normal"
    if task == "physionet2016":
        return "abnormal" if p["murmur"] or p["extrasystole"] else "normal"
    return p["pascal"]


def _recording(rng, p: dict, location: str, *, seconds: float, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """One raw recording of patient ``p`` at ``location`` and its true segmentation."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    heart, envelope = np.zeros(n), np.zeros(n)
    rr_mean = 60.0 / p["bpm"]
    systole = 0.42 - 0.0015 * p["bpm"]
    s1_gain = {"AV": 0.6, "PV": 0.6, "TV": 0.9, "MV": 1.0}[location]
    s2_gain = {"AV": 1.0, "PV": 0.9, "TV": 0.6, "MV": 0.5}[location]
    breath = np.sin(2 * np.pi * p["breath_rate"] * t + rng.uniform(0, 2 * np.pi)) ** 2
    seg, beat, pause = [], rng.uniform(0, rr_mean), False
    span = TIMING_SPAN.get(p["timing"], (0.0, 1.0))
    while beat < seconds:
        rr = rr_mean * (1 + 0.04 * rng.normal())
        if pause:
            rr, pause = rr * 1.4, False
        elif p["extrasystole"] and rng.random() < 0.12:
            rr, pause = rr * 0.6, True
        i = int(beat * rate)
        mod = 1 + 0.1 * breath[min(i, n - 1)]
        _add(heart, i, s1_gain * mod * rng.uniform(0.8, 1.2) * _damped(rate, p["f1"] * rng.uniform(0.8, 1.2), 0.02))
        s2 = beat + min(systole, 0.8 * rr)
        _add(heart, int(s2 * rate), 0.7 * s2_gain * mod * rng.uniform(0.8, 1.2)
             * _damped(rate, p["f2"] * rng.uniform(0.8, 1.2), 0.015))
        end = beat + rr
        seg += [(beat, beat + 0.1, 1), (beat + 0.1, s2, 2), (s2, s2 + 0.08, 3), (s2 + 0.08, end, 4)]
        if p["murmur"] in ("systolic", "both"):
            start, stop = beat + 0.1, s2 - 0.01
            a, b = (int((start + f * (stop - start)) * rate) for f in span)
            if b > a:
                _add(envelope, a, _shape(p["shape"], b - a))
        if p["murmur"] in ("diastolic", "both"):  # early-diastolic decrescendo over the first half of diastole
            a, b = int((s2 + 0.08) * rate), int((s2 + 0.08 + 0.5 * (end - s2 - 0.08)) * rate)
            if b > a:
                _add(envelope, a, np.exp(-np.linspace(0, 3, b - a)))
        beat = end
    heart_rms = float(np.sqrt(np.mean(heart ** 2))) + 1e-12
    x = heart
    if p["murmur"] and location in p["heard"]:
        gain = 1.0 if location == p["loudest"] else 0.5
        x = x + 0.1 * p["grade"] * gain * envelope * _band_noise(rng, n, rate, *p["band"])
    x = x + p["breath_amp"] * breath * _band_noise(rng, n, rate, 25, 150)
    x = x + heart_rms * 10 ** (-p["snr_db"] / 20) * rng.uniform(0.8, 1.25) * _pink_noise(rng, n, rate)
    for kind, (chance, count, amplitude, duration) in NOISE_EVENTS.items():
        if rng.random() < chance:
            for _ in range(rng.integers(count[0], count[1] + 1)):
                length = max(2, int(rng.uniform(*duration) * rate))
                _add(x, int(rng.uniform(0, seconds) * rate),
                     heart_rms * rng.uniform(*amplitude) * _noise_event(rng, kind, length, rate))
    if p["artifact"]:
        for _ in range(rng.integers(3, 7)):
            length = int(rng.uniform(0.2, 1.0) * rate)
            _add(x, int(rng.uniform(0, seconds) * rate), rng.uniform(1, 4) * s1_gain * rng.normal(size=length)
                 * np.hanning(length))
    seg = np.array([s for s in seg if s[0] < seconds], dtype=np.float64).reshape(-1, 3)
    seg[:, 1] = np.minimum(seg[:, 1], seconds)
    return x.astype(np.float32), seg


def simulate(task: str, *, n_patients: int = 200, seconds: float = 8.0, sample_rate: int = 4000,
             locations: int = 2, seed: int = 0) -> list[dict]:
    """Raw synthetic recordings for ``task``: dicts with patient, location, label, signal, segmentation, latent.

    CirCor tasks give each patient ``locations`` of AV/PV/TV/MV; the other tasks one recording
    per patient. The ground truth is in the docstring of ``heart_sound/synthetic.py``; the median SNR is
    ``DEFAULTS["sim_snr_db"]``. The same seed gives the same data.
    """
    check_task(task)
    rng = np.random.default_rng([seed, 7])
    out = []
    for k in range(n_patients):
        p = _patient(rng, task, DEFAULTS["sim_snr_db"])
        locs = rng.choice(LOCATIONS, size=locations, replace=False) if task.startswith("circor") else [rng.choice(LOCATIONS)]
        label = _label(p, task)
        for loc in locs:
            signal, seg = _recording(rng, p, str(loc), seconds=seconds, rate=sample_rate)
            out.append({"patient": f"{50000 + k}", "location": str(loc), "label": label, "signal": signal,
                        "segmentation": seg, "latent": p})
    return out


def write_layout(folder, task: str, *, n_patients: int = 6, seconds: float = 4.0, sample_rate: int = 4000,
                 seed: int = 0) -> Path:
    """Write simulated recordings in the real layout of ``task`` (CirCor, PhysioNet 2016 or PASCAL) under ``folder``.

    PhysioNet files are written at 2000 Hz, as the challenge's are. Used for ``data/heart_sound/``
    and by the tests; :func:`read_folder` reads them back.
    """
    folder = Path(folder)
    layout = TASKS[check_task(task)].layout
    rate = 2000 if layout == "physionet2016" else sample_rate
    items = simulate(task, n_patients=n_patients, seconds=seconds, sample_rate=rate, seed=seed)
    if layout == "circor":
        wav_dir = folder / "training_data"
        rows = {}
        for item in items:
            pid = item["patient"]
            stem = wav_dir / f"{pid}_{item['location']}"
            audio.write_wav(stem.with_suffix(".wav"), item["signal"], rate)
            with open(stem.with_suffix(".tsv"), "w") as fh:
                fh.writelines(f"{a:.3f}\t{b:.3f}\t{int(s)}\n" for a, b, s in item["segmentation"])
            labels = {"Murmur": _label(item["latent"], "circor_murmur"), "Outcome": _label(item["latent"], "circor_outcome")}
            row = rows.setdefault(pid, {"Patient ID": pid, "Recording locations:": [], **labels})
            row["Recording locations:"].append(item["location"])
        with open(folder / "training_data.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["Patient ID", "Recording locations:", "Murmur", "Outcome"])
            writer.writeheader()
            for row in rows.values():
                writer.writerow({**row, "Recording locations:": "+".join(row["Recording locations:"])})
    elif layout == "physionet2016":
        sub = folder / "training-a"
        sub.mkdir(parents=True, exist_ok=True)
        with open(sub / "REFERENCE.csv", "w") as fh:
            for k, item in enumerate(items):
                record = f"a{k + 1:04d}"
                audio.write_wav(sub / f"{record}.wav", item["signal"], rate)
                fh.write(f"{record},{1 if item['label'] == 'abnormal' else -1}\n")
    else:
        for k, item in enumerate(items):
            audio.write_wav(folder / item["label"] / f"{item['label']}__{k:03d}.wav", item["signal"], rate)
    return folder

