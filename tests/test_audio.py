"""workbench.audio (wav, resampling, band-pass, windows, augmentation, NT-Xent) and the ROC/PR and
sensitivity/specificity helpers in workbench.metrics / workbench.plots."""

import numpy as np
import pytest
import torch

from workbench import audio
from workbench.metrics import roc_pr_curves, sensitivity_specificity


def sine(freq, rate, seconds=1.0):
    return np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate).astype(np.float32)


def peak_hz(x, rate):
    spectrum = np.abs(np.fft.rfft(x))
    return np.fft.rfftfreq(len(x), 1 / rate)[spectrum.argmax()]


def test_wav_round_trip_stereo_mixdown_and_resampling(tmp_path):
    x = 0.5 * sine(100, 2000)
    audio.write_wav(tmp_path / "mono.wav", x, 2000)
    back, rate = audio.read_wav(tmp_path / "mono.wav")
    assert rate == 2000 and back.dtype == np.float32 and np.abs(back - x).max() < 1e-3
    stereo = np.stack([x, -x + 0.2], axis=1)
    audio.write_wav(tmp_path / "stereo.wav", stereo, 2000)
    samples, _ = audio.read_wav(tmp_path / "stereo.wav")
    mono, mixed = audio.to_mono(samples)
    assert samples.shape == (2000, 2) and mixed and np.allclose(mono, 0.1, atol=1e-3)
    up = audio.resample(x, 2000, 4000)
    assert len(up) == 4000 and peak_hz(up, 4000) == pytest.approx(100, abs=1)
    assert audio.resample(x, 2000, 2000) is not None and len(audio.resample(x, 44100 // 21, 4000)) > 0
    with pytest.raises(ValueError, match="not a readable wav"):
        (tmp_path / "bad.wav").write_bytes(b"nope")
        audio.read_wav(tmp_path / "bad.wav")


def test_bandpass_keeps_the_band_and_removes_the_rest():
    rate = 4000
    inside, below, above = sine(100, rate, 2), sine(5, rate, 2), sine(1200, rate, 2)
    out = audio.bandpass(inside + below + above, rate, low=25, high=400)
    core = slice(1000, 7000)
    assert np.abs(out[core] - inside[core]).max() < 0.1
    assert audio.bandpass(sine(100, 500, 1), 500, high=400).shape == (500,)  # high capped below Nyquist
    with pytest.raises(ValueError, match="low < high"):
        audio.bandpass(inside, rate, low=500, high=400)


def test_frames_overlap_cover_the_end_and_pad_short_signals():
    x = np.arange(10, dtype=np.float32)
    w = audio.frame(x, size=4, hop=2)
    assert w.tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert audio.frame(x, size=4, hop=3)[-1].tolist() == [6, 7, 8, 9]  # last window ends at the end
    assert audio.frame(x[:3], size=4, hop=2).tolist() == [[0, 1, 2, 0]]


def test_augmented_views_differ_keep_shape_and_follow_the_generator():
    x = torch.from_numpy(np.stack([sine(60, 4000), sine(150, 4000)]))
    a = audio.augment_views(x, rate=4000, generator=torch.Generator().manual_seed(1))
    b = audio.augment_views(x, rate=4000, generator=torch.Generator().manual_seed(1))
    c = audio.augment_views(x, rate=4000, generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, c) and not torch.allclose(a, x)


def test_nt_xent_is_low_for_matching_views_and_trains():
    torch.manual_seed(0)
    z = torch.randn(16, 8)
    matched = audio.nt_xent(z, z + 0.01 * torch.randn(16, 8), temperature=0.1)
    random = audio.nt_xent(z, torch.randn(16, 8), temperature=0.1)
    assert matched < 0.1 < np.log(31) * 0.5 < random
    w = torch.randn(8, 8, requires_grad=True)
    audio.nt_xent(z @ w, z @ w).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    with pytest.raises(ValueError, match="two \\(batch, dim\\) views"):
        audio.nt_xent(z, z[:4])


def test_sensitivity_specificity_binary_and_one_vs_rest_macro():
    assert sensitivity_specificity([0, 0, 1, 1], [0, 1, 1, 1], labels=[0, 1]) == {"sensitivity": 1.0, "specificity": 0.5}
    y, p = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0])
    out = sensitivity_specificity(y, p, labels=[0, 1, 2])
    # per class recall 0.5, 1, 0.5; specificity TN/(TN+FP): class 0 3/4, class 1 3/4, class 2 4/4
    assert out["sensitivity"] == pytest.approx(2 / 3) and out["specificity"] == pytest.approx((0.75 + 0.75 + 1) / 3)


def test_roc_pr_curves_areas_match_scikit_learn_and_plot():
    from sklearn.metrics import roc_auc_score

    from workbench import plots

    rng = np.random.default_rng(0)
    y = np.array(["a", "b", "c"] * 10)
    score = rng.dirichlet([1, 1, 1], size=30)
    curves = roc_pr_curves(y, score, labels=["a", "b", "c"])
    assert set(curves["class"]) == {"a", "b", "c"} and set(curves["curve"]) == {"roc", "pr"}
    area = curves[(curves["class"] == "b") & (curves["curve"] == "roc")]["area"].iloc[0]
    assert area == pytest.approx(roc_auc_score(y == "b", score[:, 1]))
    binary = roc_pr_curves(["n", "y", "y", "n"], [[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]], labels=["n", "y"])
    assert set(binary["class"]) == {"y"}
    fig = plots.plot_roc_pr(curves)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 4  # three classes and the diagonal
    seg = np.array([[0.0, 0.1, 1], [0.1, 0.3, 2], [0.3, 0.38, 3], [0.38, 1.0, 4]])
    fig = plots.plot_recordings([{"signal": sine(50, 1000), "sample_rate": 1000, "title": "x", "segmentation": seg}])
    assert len(fig.axes) >= 2
