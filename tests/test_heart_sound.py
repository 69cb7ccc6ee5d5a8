"""Heart-sound workflow: generator, the three real layouts, bad input, pretraining, modes, the notebook."""

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import audio
from workbench.tasks import heart_sound as hs
from workbench.execute import run_workflow
from workbench.tasks.heart_sound import synthetic

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "heart_sound_classification.ipynb"
SAMPLES = ROOT / "data" / "heart_sound"
#: Tiny settings for runs of the notebook: a few seconds of 16 PhysioNet-style records.
TINY = {"task": "physionet2016", "epochs": 1, "pretrain_epochs": 1, "batch_size": 16}


@pytest.fixture(scope="module")
def physionet(tmp_path_factory):
    # seed 7: the 2 validation patients of the notebook's split hold both classes (val_auroc picks the best epoch)
    return hs.write_layout(tmp_path_factory.mktemp("pcg") / "physionet", "physionet2016", n_patients=16, seconds=3,
                           seed=7)


def pcg(seconds=3.0, rate=4000, seed=0):
    """One synthetic recording (raw) of ``seconds``."""
    return hs.simulate("physionet2016", n_patients=1, seconds=seconds, sample_rate=rate, seed=seed)[0]["signal"]


def write_circor(folder, rows, *, wavs=None):
    """A CirCor layout with rows (patient, murmur); every patient gets AV and MV wavs unless ``wavs`` says which."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["Patient ID,Recording locations:,Murmur,Outcome"]
    for pid, murmur in rows:
        lines.append(f"{pid},AV+MV,{murmur},Normal")
        for loc in (wavs or {}).get(pid, ["AV", "MV"]):
            audio.write_wav(folder / "training_data" / f"{pid}_{loc}.wav", pcg(seed=int(pid) % 97), 4000)
    (folder / "training_data.csv").write_text("\n".join(lines) + "\n")
    return folder


# --------------------------------------------------------------------------- generator


def test_generator_is_seeded_and_its_labels_follow_the_documented_latents():
    a = hs.simulate("circor_murmur", n_patients=30, seconds=2, seed=3)
    b = hs.simulate("circor_murmur", n_patients=30, seconds=2, seed=3)
    assert all(np.array_equal(x["signal"], y["signal"]) for x, y in zip(a, b))
    assert len(a) == 60 and {x["location"] for x in a} <= set(hs.LOCATIONS)
    for item in a:
        p = item["latent"]
        assert 60 <= p["bpm"] <= 140
        unknown = p["snr_db"] < synthetic._unknown_below(hs.DEFAULTS["sim_snr_db"])
        want = "Unknown" if unknown else ("Present" if p["murmur"] else "Absent")
        assert item["label"] == want
    # heart rate in the segmentation: one S1 per beat, beat-to-beat variability around 60 / bpm
    item = hs.simulate("physionet2016", n_patients=1, seconds=20, seed=5)[0]
    s1 = item["segmentation"][item["segmentation"][:, 2] == 1][:, 0]
    rr = np.diff(s1)
    assert abs(rr.mean() - 60 / item["latent"]["bpm"]) < 0.05 and rr.std() > 0
    pascal = hs.simulate("pascal", n_patients=40, seconds=1.5, seed=0)
    assert {x["label"] for x in pascal} == set(hs.TASKS["pascal"].classes)


def test_murmur_latents_follow_the_circor_2022_counts():
    """Issue 24: murmur share, Unknown share, grade, timing, shape and pitch as counted in CirCor's training set."""
    rng = np.random.default_rng(0)
    patients = [synthetic._patient(rng, "circor_murmur", 10.0) for _ in range(6000)]
    murmurs = [p for p in patients if p["murmur"]]
    assert abs(len(murmurs) / len(patients) - 179 / 874) < 0.02
    assert abs(np.mean([p["unknown"] for p in patients]) - 68 / 942) < 0.015

    def share(key, value):
        return np.mean([p[key] == value for p in murmurs])

    assert abs(share("grade", 1) - 104 / 178) < 0.04 and abs(share("grade", 3) - 46 / 178) < 0.04
    assert abs(share("timing", "holosystolic") - 101 / 178) < 0.04 and abs(share("timing", "early") - 59 / 178) < 0.04
    assert abs(share("shape", "plateau") - 111 / 178) < 0.04 and abs(share("pitch", "low") - 87 / 178) < 0.04
    assert abs(share("loudest", "PV") - 62 / 179) < 0.04 and share("murmur", "diastolic") < 0.03
    # grade I is not heard at every location, grade II and up is
    assert all(len(p["heard"]) == 4 for p in murmurs if p["grade"] > 1)
    assert 0.05 < np.mean([len(p["heard"]) == 4 for p in murmurs if p["grade"] == 1]) < 0.3


def test_a_murmur_adds_band_limited_energy_in_systole():
    def systolic_power(item):
        x = hs.preprocess(item["signal"], 4000)
        seg = item["segmentation"]
        parts = [x[int(a * 4000) + 40:int(b * 4000) - 40] for a, b, s in seg if s == 2 and b - a > 0.05]
        return np.mean([np.mean(p ** 2) for p in parts if len(p)]) / np.mean(x ** 2)

    items = hs.simulate("circor_murmur", n_patients=120, seconds=4, seed=2)
    loud = [systolic_power(i) for i in items if i["latent"]["murmur"] == "systolic" and i["latent"]["grade"] == 3
            and i["latent"]["snr_db"] > 10]
    quiet = [systolic_power(i) for i in items if not i["latent"]["murmur"] and i["latent"]["snr_db"] > 10]
    assert loud and quiet and np.median(loud) > 2 * np.median(quiet)


# --------------------------------------------------------------------------- real layouts


def test_sample_data_in_all_three_layouts_loads_and_stays_small():
    total = sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file())
    assert total < 2_000_000
    circor, notes = hs.read_folder(SAMPLES / "circor", "circor_murmur")
    assert len(circor) == 16 and {r.label for r in circor} == {"Absent", "Present", "Unknown"}
    assert all(r.segmentation is not None and set(r.segmentation[:, 2]) <= {0, 1, 2, 3, 4} for r in circor)
    assert {r.location for r in circor} <= set(hs.LOCATIONS) and notes == []
    outcome, _ = hs.read_folder(SAMPLES / "circor", "circor_outcome")
    assert {r.label for r in outcome} == {"Normal", "Abnormal"}
    physionet, notes = hs.read_folder(SAMPLES / "physionet2016", "physionet2016")
    assert len(physionet) == 8 and notes == ["resampled 8 recording(s) from 2000 Hz to 4000 Hz"]
    assert all(len(r.signal) == 12000 and abs(r.signal.std() - 1) < 1e-3 for r in physionet)
    pascal, _ = hs.read_folder(SAMPLES / "pascal", "pascal")
    assert {r.label for r in pascal} == set(hs.TASKS["pascal"].classes)


def test_splits_are_by_patient_and_few_shot_is_a_stratified_subset():
    data = hs.load("", "circor_murmur", n_patients=40, seconds=2, seed=0)
    patients = data.patients
    groups = [set(patients[idx]) for idx in (data.labelled_idx, data.val_idx, data.test_idx)]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert set(data.train_idx) == set(data.labelled_idx) | set(data.val_idx)
    assert all(len(set(data.labels[patients == p])) == 1 for p in set(patients))  # a patient's recordings share its label
    few = hs.load("", "circor_murmur", n_patients=40, seconds=2, seed=0, label_fraction=0.1)
    assert set(few.labelled_idx) < set(data.labelled_idx) and set(few.labels[few.labelled_idx]) == set(data.labels[data.labelled_idx])
    assert np.array_equal(few.train_idx, data.train_idx) and np.array_equal(few.test_idx, data.test_idx)
    assert "patients" in data.to_frame().index and data.to_dict()["patients"] == 40


# --------------------------------------------------------------------------- bad input


def test_other_sample_rate_is_resampled_and_stereo_is_mixed_down_and_both_logged(tmp_path, caplog):
    folder = tmp_path / "pascal"
    audio.write_wav(folder / "normal" / "a.wav", pcg(rate=2000), 2000)
    audio.write_wav(folder / "normal" / "b.wav", np.stack([pcg(), pcg(seed=1)], axis=1), 4000)
    audio.write_wav(folder / "murmur" / "c.wav", pcg(rate=8000), 8000)
    with caplog.at_level(logging.INFO, logger=hs.__name__):
        recordings, notes = hs.read_folder(folder, "pascal", sample_rate=4000)
    assert [len(r.signal) for r in recordings] == [12000, 12000, 12000]
    assert "a.wav: resampled from 2000 Hz to 4000 Hz" in caplog.text and "c.wav: resampled from 8000 Hz" in caplog.text
    assert "b.wav: 2 channels mixed down to mono" in caplog.text
    assert "resampled 1 recording(s) from 2000 Hz to 4000 Hz" in notes
    assert "mixed 1 multichannel recording(s) down to mono" in notes


def test_empty_and_short_recordings_are_skipped_and_counted_but_not_all_of_them(tmp_path, caplog):
    folder = tmp_path / "pascal"
    audio.write_wav(folder / "normal" / "ok.wav", pcg(), 4000)
    audio.write_wav(folder / "normal" / "empty.wav", np.zeros(0), 4000)
    audio.write_wav(folder / "normal" / "short.wav", pcg(seconds=0.2), 4000)
    with caplog.at_level(logging.INFO, logger=hs.__name__):
        recordings, notes = hs.read_folder(folder, "pascal")
    assert [r.name for r in recordings] == ["ok.wav"]
    assert "skipped 2 recording(s) shorter than 1 s (empty.wav, short.wav)" in notes
    assert "short.wav: skipped, 0.20 s" in caplog.text
    (folder / "normal" / "ok.wav").unlink()
    with pytest.raises(ValueError, match="every recording was skipped \\(2 shorter than 1 s"):
        hs.read_folder(folder, "pascal")


def test_a_label_outside_the_task_names_the_file_and_the_row(tmp_path):
    circor = write_circor(tmp_path / "circor", [("101", "Absent"), ("102", "Maybe")])
    with pytest.raises(ValueError, match=r"training_data.csv row 3 \(patient 102\): label 'Maybe' is not one of .*Absent, Present, Unknown"):
        hs.read_folder(circor, "circor_murmur")
    ref = tmp_path / "physionet" / "training-b"
    ref.mkdir(parents=True)
    audio.write_wav(ref / "b0001.wav", pcg(rate=2000), 2000)
    (ref / "REFERENCE.csv").write_text("b0001,-1\nb0002,0\n")
    with pytest.raises(ValueError, match=r"REFERENCE.csv row 2 \(record b0002\): label '0'"):
        hs.read_folder(tmp_path / "physionet", "physionet2016")
    audio.write_wav(tmp_path / "pascal" / "rumble" / "x.wav", pcg(), 4000)
    with pytest.raises(ValueError, match=r"rumble \(e.g. x.wav\): label 'rumble' is not one of the pascal classes"):
        hs.read_folder(tmp_path / "pascal", "pascal")


def test_physionet_validation_folder_copies_are_read_once_and_counted(tmp_path):
    """The challenge's validation/ folder copies training recordings under the same record names."""
    import shutil

    root = hs.write_layout(tmp_path / "physionet", "physionet2016", n_patients=8, seconds=3, seed=0)
    alone, _ = hs.read_folder(root, "physionet2016")
    rows = (root / "training-a" / "REFERENCE.csv").read_text().splitlines()[:3]
    validation = root / "validation"
    validation.mkdir()
    for row in rows:
        shutil.copy(root / "training-a" / f"{row.split(',')[0]}.wav", validation)
    (validation / "REFERENCE.csv").write_text("\n".join(rows) + "\n")

    recordings, notes = hs.read_folder(root, "physionet2016")
    assert [r.patient for r in recordings] == [r.patient for r in alone]  # each recording once, as a training record
    assert not any(r.patient.startswith("validation/") for r in recordings)
    dropped = [n for n in notes if n.startswith("dropped 3 duplicate record(s)")]
    assert dropped and "validation/a0001 (read from training-a/)" in dropped[0]
    only, _ = hs.read_folder(validation, "physionet2016")  # the validation folder on its own is read as given
    assert len(only) == 3


def test_a_circor_patient_without_a_wav_names_the_patient(tmp_path):
    circor = write_circor(tmp_path / "circor", [("201", "Absent"), ("202", "Present")], wavs={"202": []})
    with pytest.raises(FileNotFoundError, match="row 3: patient 202 has no recording"):
        hs.read_folder(circor, "circor_murmur")


# --------------------------------------------------------------------------- model, pretraining, modes


def test_recording_probability_is_the_mean_of_its_windows():
    data = hs.load("", "physionet2016", n_patients=12, seconds=3.5, seed=0)
    model = hs.build_model(data)
    batches = hs.WindowBatches(data, data.test_idx[:3])
    assert np.bincount(batches.owner).tolist() == [3, 3, 3]  # 3.5 s, 2 s windows every 1 s: 0-2, 1-3, 1.5-3.5
    proba = hs.predict_proba(model, batches)
    with torch.no_grad():
        windows = torch.softmax(model(torch.from_numpy(batches.X)), 1).numpy()
    assert np.allclose(proba[1], windows[3:6].mean(0), atol=1e-6)


def test_pretraining_loads_like_an_external_checkpoint_and_is_cached_by_fingerprint(tmp_path):
    import workbench as wb

    data = hs.load("", "physionet2016", n_patients=12, seconds=3, seed=0)
    cache = tmp_path / "cache"
    ckpt = hs.pretrain(data, pretrain_epochs=1, progress=False, cache_root=cache)
    assert ckpt.suffix == ".safetensors" and json.loads(ckpt.with_suffix(".json").read_text())["fingerprint"] == ckpt.parent.name
    model = hs.build_model(data)
    report = wb.load_pretrained(model, ckpt, expect_missing=["head.*"])
    assert report.missing == ["head.1.bias", "head.1.weight"] and all(k.startswith("projector.") for k in report.unexpected)
    stamp = ckpt.stat().st_mtime_ns
    assert hs.pretrain(hs.load("", "physionet2016", n_patients=12, seconds=3, seed=0, label_fraction=0.5),
                       pretrain_epochs=1, progress=False, cache_root=cache) == ckpt  # same recordings: reused
    assert ckpt.stat().st_mtime_ns == stamp
    other = hs.load("", "physionet2016", n_patients=12, seconds=3, seed=1)
    assert hs.pretrain(other, pretrain_epochs=1, progress=False, cache_root=cache) != ckpt
    assert hs.pretrain(data, pretrain_epochs=1, temperature=0.5, progress=False, cache_root=cache) != ckpt


def test_linear_eval_locks_the_encoder_and_its_batchnorm_full_trains_it_at_the_ratio(tmp_path):
    import workbench as wb

    data = hs.load("", "physionet2016", n_patients=12, seconds=3, seed=0)
    torch.manual_seed(0)
    model = hs.build_model(data)
    encoder = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head = model.head[1].weight.clone()
    run = wb.Run(tmp_path / "linear", params={"mode": "linear_eval"})
    history = hs.finetune(model, data, mode="linear_eval", epochs=1, batch_size=16, run=run, progress=False)
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.items())  # running stats too
    assert not torch.equal(head, model.head[1].weight)
    log = (tmp_path / "linear" / "train.log").read_text()  # the run's train.log (workbench.fit's, and the mode)
    assert "fine-tuning (linear_eval) on" in log and "epoch=0" in log and "lr_head=" in log
    model = hs.build_model(data)
    history = hs.finetune(model, data, mode="full", epochs=1, batch_size=16, learning_rate=1e-2, backbone_lr_ratio=0.1,
                          lr_scheduler_type="constant", warmup_ratio=0.0, progress=False)
    row = history.rows[0]
    assert row["lr_head"] == pytest.approx(1e-2) and row["lr_backbone"] == pytest.approx(1e-3)
    assert not all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.items())
    with pytest.raises(ValueError, match="mode='probe' is not one of linear_eval, few_shot, full"):
        hs.strategy_of("probe")


# --------------------------------------------------------------------------- the notebook


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900, env=env)


def test_notebook_under_papermill_writes_the_run_folder_and_equals_the_in_process_run(physionet, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_NUM_THREADS", "1")
    params = {**TINY, "data_path": str(physionet), "save_every": 1}
    out = tmp_path / "papermill"
    env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path / "cache_papermill"), "MPLBACKEND": "Agg"}
    proc = _cli(["run", str(NOTEBOOK), *[x for k, v in params.items() for x in ("-p", k, str(v))], "-o", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "final_metrics.json").read_text())
    assert all(isinstance(v, (int, float)) for v in final.values())  # flat
    for split in ("train_", "val_", "test_", "baseline_test_"):
        for name in ("loss", "accuracy", "macro_f1", "precision", "recall", "auroc", "auprc", "sensitivity", "specificity"):
            assert split + name in final, split + name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and {"lr_backbone", "lr_head", "val_auroc"} <= set(rows[0])
    assert (out / "checkpoints" / "best.safetensors").exists() and (out / "checkpoints" / "last.pt").exists()
    assert (out / "checkpoints" / "epoch000.safetensors").exists()  # save_every
    assert {p.name for p in (out / "figures").iterdir()} == {"recordings.png", "lr_schedule.png", "training_curves.png",
                                                             "roc_pr.png", "confusion_matrix.png", "metrics_vs_baseline.png"}
    report = json.loads((out / "load_report.json").read_text())
    assert report["missing"] == ["head.1.bias", "head.1.weight"] and report["loaded_fraction"] > 0.9
    log = (out / "train.log").read_text()
    assert "resampled 16 recording(s) from 2000 Hz to 4000 Hz" in log and "encoder from NT-Xent pretraining" in log
    assert "fine-tuning (linear_eval) on" in log and "epoch=0" in log
    executed = json.loads((out / "notebook.ipynb").read_text())
    outputs = [o for c in executed["cells"] for o in c.get("outputs", [])]
    assert sum("<audio" in "".join(o.get("data", {}).get("text/html", "")) for o in outputs) == 2  # a player per class
    per_cell = [sum("image/png" in o.get("data", {}) for o in c.get("outputs", [])) for c in executed["cells"]]
    assert max(per_cell) == 1 and sum(per_cell) == 6

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache_in_process"))
    in_process = run_workflow(hs.WORKFLOW, {**params, "output_dir": str(tmp_path / "in_process")})
    assert in_process.final == final


def test_wandb_logs_offline_into_the_run_folder(physionet, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("TORCH_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    result = run_workflow(hs.WORKFLOW, {**TINY, "data_path": str(physionet), "pretrained_checkpoint": "none", "tracker": "wandb",
                              "watch": True, "output_dir": str(out)})
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and result.final["test_auroc"] == json.loads((out / "final_metrics.json").read_text())["test_auroc"]


def test_without_wandb_one_notice_and_training_goes_on(physionet, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_NUM_THREADS", "1")
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_workflow(hs.WORKFLOW, {**TINY, "data_path": str(physionet), "pretrained_checkpoint": "none", "tracker": "wandb",
                         "output_dir": str(out)})
    notices = [str(w.message) for w in caught if "wandb" in str(w.message)]
    assert len(notices) == 1 and "not installed" in notices[0] and len(notices[0].splitlines()) == 1
    assert (out / "final_metrics.json").exists() and not (out / "wandb").exists()


def test_sweep_spec_covers_four_tasks_in_three_modes():
    from workbench.sweeps import load_spec

    spec = load_spec(ROOT / "notebooks" / "sweeps" / "heart_sound_tasks.yaml")
    text = json.dumps(spec, default=str)
    for name in (*hs.TASKS, *hs.MODES):
        assert name in text
