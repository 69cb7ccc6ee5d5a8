"""Event-sequence workflow: loading and its bad-input rules, ptls encoders, CoLES, fine-tuning, ptls checkpoints."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("ptls")

from workbench.tasks import event_sequence as es  # noqa: E402
from workbench.execute import run_workflow

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "event_sequence_classification.ipynb"
TINY = {"hidden_size": 8, "embedding_dim": 4}
TINY_COLES = {**TINY, "pretrain_epochs": 1, "pretrain_batch_size": 8, "split_count": 2, "cnt_min": 5, "cnt_max": 15}


@pytest.fixture(scope="module")
def tables():
    return es.simulate(n_clients=48, max_len=60, seed=0)


@pytest.fixture(scope="module")
def tiny_csv(tables, tmp_path_factory):
    return es.write_tables(*tables, tmp_path_factory.mktemp("events") / "events.csv")[0]


@pytest.fixture(scope="module")
def data(tiny_csv):
    return es.load(str(tiny_csv), label_fraction=0.5, seed=0)


def _write(tmp_path, events, labels, suffix=".csv"):
    return str(es.write_tables(events, labels, tmp_path / f"events{suffix}")[0])


def test_simulated_clients_follow_the_documented_layout():
    events, labels = es.simulate(n_clients=40, seed=1)
    lengths = events.groupby(es.CLIENT).size()
    assert lengths.min() >= 20 and lengths.max() <= 500 and len(lengths) == 40
    assert list(events.columns) == ["client_id", "event_time", "event_type", "channel", "amount"]
    assert sorted(labels["target"].unique()) == ["class0", "class1", "class2", "class3"]
    assert (labels["target"].value_counts() == 10).all()  # balanced
    assert (events.groupby(es.CLIENT)["event_time"].diff().dropna() >= 0).all()
    # the ground truth: classes 2 and 3 repeat the previous event type far more often than classes 0 and 1
    repeats = events.groupby(es.CLIENT)["event_type"].apply(lambda s: (s.to_numpy()[1:] == s.to_numpy()[:-1]).mean())
    by_class = repeats.groupby(labels.set_index(es.CLIENT)["target"]).mean()
    assert by_class[["class2", "class3"]].min() > by_class[["class0", "class1"]].max() + 0.1


def test_csv_and_parquet_load_the_same_clients_split_by_client(tables, tmp_path, data):
    parquet = es.load(_write(tmp_path, *tables, suffix=".parquet"), label_fraction=0.5, seed=0)
    assert len(data.sequences) == 48 and data.categorical == ["event_type", "channel"]
    assert data.numeric == ["amount", "time_gap"]
    for a, b in zip(data.sequences, parquet.sequences):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    parts = [data.labelled_idx, data.val_idx, data.test_idx]
    assert len(np.unique(np.concatenate(parts))) == sum(map(len, parts))  # disjoint
    assert set(data.labelled_idx) | set(data.val_idx) <= set(data.train_idx)
    assert data.vocab["channel"] == ["<pad>", "<unknown>", "atm", "pos", "web"]
    first = data.sequences[0]
    gaps = np.diff(first["event_time"])
    np.testing.assert_allclose(first["time_gap"][1:], np.log1p(gaps), rtol=1e-5)
    assert first["time_gap"][0] == 0 and first["event_type"].dtype == np.int64 and first["amount"].dtype == np.float32
    assert "<table" in data._repr_html_() and data.to_frame().loc["total", "test"] == len(data.test_idx)


def test_a_category_unseen_in_training_maps_to_unknown_with_a_count(tables, tmp_path, data):
    events, labels = tables[0].copy(), tables[1]
    test_client = data.client_ids[data.test_idx[0]]
    rows = np.flatnonzero(events[es.CLIENT] == test_client)[:3]
    events.loc[rows, "event_type"] = "e99"  # no training client has it
    with pytest.warns(UserWarning, match=r"3 event\(s\) have a event_type not seen in the training clients \(\['e99'\]\)"):
        loaded = es.load(_write(tmp_path, events, labels), label_fraction=0.5, seed=0)
    assert loaded.notices["events with a 'event_type' unseen in training (-> unknown)"] == 3
    seq = loaded.sequences[data.test_idx[0]]
    assert (seq["event_type"] == es.UNKNOWN).sum() == 3 and "e99" not in loaded.vocab["event_type"]
    model = es.build_model(loaded, **TINY)
    proba = es.predict_proba(model, loaded, loaded.test_idx[:2])  # no crash
    assert proba.shape == (2, 4) and np.isfinite(proba).all()


def test_events_out_of_time_order_are_sorted_with_a_notice(tables, tmp_path, data):
    events, labels = tables
    shuffled = events.sample(frac=1.0, random_state=0)
    with pytest.warns(UserWarning, match=r"48 client\(s\) have events out of time order; they were sorted"):
        loaded = es.load(_write(tmp_path, shuffled, labels), label_fraction=0.5, seed=0)
    assert loaded.notices["clients with events out of time order (sorted)"] == 48
    for a, b in zip(data.sequences, loaded.sequences):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_client_with_zero_events_is_excluded_with_a_count(tables, tmp_path):
    events, labels = tables
    extra = pd.DataFrame({es.CLIENT: ["ghost1", "ghost2"], es.TARGET: ["class0", "class1"]})
    with pytest.warns(UserWarning, match=r"2 labelled client\(s\) have zero events and are excluded .*'ghost1'"):
        loaded = es.load(_write(tmp_path, events, pd.concat([labels, extra])), label_fraction=0.5, seed=0)
    assert len(loaded.sequences) == 48 and "ghost1" not in set(loaded.client_ids)
    assert loaded.notices["clients without events (excluded)"] == 2


def test_a_client_without_a_label_is_an_error_listing_the_first_five(tables, tmp_path):
    events, labels = tables
    dropped = labels[es.CLIENT].iloc[[3, 5, 7, 9, 11, 13]].tolist()
    with pytest.raises(ValueError, match=r"6 client\(s\) have events but no label \(first 5: " +
                       str(sorted(dropped)[:5]).replace("[", r"\[").replace("]", r"\]")):
        es.load(_write(tmp_path, events, labels[~labels[es.CLIENT].isin(dropped)]))


def test_conflicting_label_rows_are_an_error_and_repeated_ones_a_counted_notice(tables, tmp_path):
    events, labels = tables
    first, second = labels.iloc[0], labels.iloc[1]
    other = "class1" if first[es.TARGET] != "class1" else "class0"
    conflicting = pd.concat([labels, pd.DataFrame({es.CLIENT: [first[es.CLIENT]], es.TARGET: [other]})])
    with pytest.raises(ValueError, match=r"1 client\(s\) have label rows that disagree \(first 5: "
                       + repr(first[es.CLIENT]) + r": \[.*keep one row per client_id"):
        es.load(_write(tmp_path, events, conflicting), label_fraction=0.5, seed=0)
    repeated = pd.concat([labels, labels.iloc[[1, 1]]])
    with pytest.warns(UserWarning, match=r"2 label row\(s\) repeat a client's row with the same label"):
        loaded = es.load(_write(tmp_path, events, repeated), label_fraction=0.5, seed=0)
    assert loaded.notices["repeated label rows (same label, dropped)"] == 2 and len(loaded.sequences) == 48
    assert loaded.labels[list(loaded.client_ids).index(second[es.CLIENT])] == second[es.TARGET]


def test_nan_in_a_numeric_field_is_an_error_naming_it_or_imputed_when_asked(tables, tmp_path, data):
    events, labels = tables[0].copy(), tables[1]
    events.loc[[4, 10], "amount"] = np.nan
    path = _write(tmp_path, events, labels)
    with pytest.raises(ValueError, match=r"numeric field 'amount' has 2 NaN value\(s\).*impute_numeric=True"):
        es.load(path)
    with pytest.warns(UserWarning, match=r"2 NaN value\(s\) in numeric field 'amount' were imputed"):
        loaded = es.load(path, impute_numeric=True, label_fraction=0.5, seed=0)
    train_amounts = np.concatenate([data.sequences[i]["amount"] for i in data.train_idx])
    client = int(np.flatnonzero(data.client_ids == events.loc[4, es.CLIENT])[0])
    position = int(np.sum(events[es.CLIENT].iloc[:4] == events.loc[4, es.CLIENT]))
    assert loaded.sequences[client]["amount"][position] == pytest.approx(np.median(train_amounts), rel=1e-4)
    assert np.isfinite(np.concatenate([s["amount"] for s in loaded.sequences])).all()


def test_truncation_keeps_the_last_max_seq_len_events(tiny_csv, data):
    short = es.load(str(tiny_csv), max_seq_len=25, label_fraction=0.5, seed=0)
    lengths = data.lengths
    assert short.lengths.max() == 25
    assert short.notices["clients truncated to their last max_seq_len events"] == int((lengths > 25).sum())
    longest = int(np.argmax(lengths))
    for key in data.sequences[longest]:
        np.testing.assert_array_equal(short.sequences[longest][key], data.sequences[longest][key][-25:])


def test_batches_are_ptls_padded_batches(data):
    from ptls.data_load.padded_batch import PaddedBatch

    batches = data.batches(data.labelled_idx, batch_size=5, shuffle=True, seed=0)
    x, y = next(iter(batches))
    assert isinstance(x, PaddedBatch) and len(y) == 5 and len(batches) == int(np.ceil(len(data.labelled_idx) / 5))
    assert x.payload["event_type"].shape == (5, int(x.seq_lens.max())) and x.payload["amount"].dtype == torch.float32
    assert int((x.payload["event_type"] != 0).sum()) == int(x.seq_lens.sum())  # index 0 only pads


def test_wrong_settings_name_what_is_accepted(data):
    with pytest.raises(ValueError, match="encoder_type='rnn' is not one of gru, lstm, transformer"):
        es.build_model(data, encoder_type="rnn")
    with pytest.raises(ValueError, match="head_activation='swish' is not one of relu, gelu, tanh"):
        es.build_model(data, head_activation="swish", **TINY)
    with pytest.raises(ValueError, match=r"head_hidden='256;128' must be comma-separated"):
        es.build_model(data, head_hidden="256;128", **TINY)
    with pytest.raises(ValueError, match="class_weights='auto' is not one of none, balanced"):
        es.build_model(data, class_weights="auto")


@pytest.mark.parametrize("encoder_type", ["lstm", "transformer"])
def test_other_encoders_train_and_embed(data, encoder_type):
    torch.manual_seed(0)
    model = es.build_model(data, encoder_type=encoder_type, head_hidden="", **TINY)
    history = es.finetune(model, data, epochs=1, learning_rate=1e-3, batch_size=8, progress=False)
    assert np.isfinite(history.rows[0]["train_loss"])
    embeddings, ids, labels = es.get_embeddings(model, data, data.test_idx)
    assert embeddings.shape == (len(data.test_idx), 8) and list(ids) == list(data.client_ids[data.test_idx])


def test_coles_pretraining_is_cached_by_fingerprint_and_loads_into_the_classifier(data, tmp_path):
    first = es.pretrain(data, progress=False, cache_root=tmp_path, **TINY_COLES)
    stamp = first.stat().st_mtime_ns
    assert es.pretrain(data, progress=False, cache_root=tmp_path, **TINY_COLES) == first
    assert first.stat().st_mtime_ns == stamp
    assert es.pretrain(data, seed=1, progress=False, cache_root=tmp_path, **TINY_COLES) != first
    meta = json.loads(first.with_suffix(".json").read_text())
    assert meta["objective"] == "coles" and meta["fingerprint"] == first.parent.name
    rows = [json.loads(line) for line in (first.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["train_loss"]) and rows[0]["train_loss"] > 0
    model = es.build_model(data, head_hidden="8", **TINY)
    report = es.load_checkpoint(model, first)
    assert report.prefix_map == {"_seq_encoder.": "encoder."} and not report.unexpected and not report.mismatched
    assert report.missing == ["head.0.bias", "head.0.weight", "head.3.bias", "head.3.weight"]


def test_finetuning_freezes_then_unfreezes_with_weights_smoothing_clipping_bf16_and_top_k(data, tmp_path):
    import workbench as wb

    torch.manual_seed(0)
    model = es.build_model(data, head_hidden="8", class_weights="balanced", label_smoothing=0.2, **TINY)
    assert torch.allclose(model.class_weights, torch.as_tensor(data.class_weights(), dtype=torch.float32))
    assert "class_weights" not in str(list(model.state_dict()))  # a loss setting, not a weight
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    snapshots = []

    class Snapshot(wb.Callback):
        def on_epoch_end(self, trainer, logs):
            snapshots.append({k: v.clone() for k, v in model.encoder.state_dict().items()})

    run = wb.Run(tmp_path / "run", params={"test": 1})
    history = es.finetune(model, data, epochs=4, learning_rate=1e-2, batch_size=4, freeze_epochs=2, grad_clip=0.5,
                          amp="bf16", save_top_k=2, backbone_lr_ratio=0.5, run=run, callbacks=[Snapshot()], progress=False)
    weights = [k for k in before if "num_batches" not in k and "running" not in k]
    assert all(torch.equal(before[k], snapshots[1][k]) for k in weights)  # frozen for epochs 0-1
    assert any(not torch.equal(snapshots[1][k], snapshots[3][k]) for k in weights)  # trained in epochs 2-3
    assert all(np.isfinite(r["train_loss"]) for r in history.rows) and len(history.rows) == 4
    tops = sorted(p.name for p in run.checkpoints.glob("top-epoch*.safetensors"))
    assert len(tops) == 2 and (run.checkpoints / "best.safetensors").exists()
    steps = len(data.batches(data.labelled_idx, batch_size=4))
    curve = es.lr_frame(history, freeze_epochs=2, steps_per_epoch=steps, schedule="cosine")
    assert (curve.loc[: 2 * steps - 1, "backbone"] == 0).all() and (curve.loc[2 * steps:, "backbone"] > 0).all()
    assert curve.attrs["freeze_steps"] == 2 * steps and (curve["head"] > 0).all()
    unfrozen = curve.loc[2 * steps:]  # the encoder learns at backbone_lr_ratio times the head's rate
    assert np.allclose(unfrozen["backbone"], 0.5 * unfrozen["head"])
    # the loss: class-weighted, label-smoothed cross-entropy
    x, y = next(iter(data.batches(data.labelled_idx, batch_size=6)))
    model.eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x), y, weight=model.class_weights, label_smoothing=0.2)
        assert torch.allclose(model.loss((x, y)), expected)


def test_embeddings_are_saved_with_client_ids_and_labels(data, tmp_path):
    model = es.build_model(data, **TINY)
    embeddings, ids, labels = es.get_embeddings(model, data)
    path = es.save_embeddings(tmp_path / "embeddings.npz", embeddings, ids, labels)
    back = np.load(path)
    np.testing.assert_array_equal(back["embeddings"], embeddings)
    assert list(back["client_ids"]) == list(data.client_ids) and list(back["labels"]) == list(data.labels)
    # the same as one client at a time (the length-sorted batches are put back in order)
    one = es.get_embeddings(model, data, [5])[0]
    np.testing.assert_allclose(one[0], embeddings[5], rtol=1e-4, atol=1e-5)


def test_a_ptls_coles_checkpoint_written_by_lightning_loads_with_an_exact_report(data, tmp_path):
    from functools import partial

    import pytorch_lightning as pl
    from ptls.frames.coles import CoLESModule
    from ptls.nn import Head

    torch.manual_seed(0)
    module = CoLESModule(seq_encoder=es.build_encoder(data, **TINY),
                         head=Head(input_size=8, hidden_layers_sizes=[4], use_norm_encoder=True),  # a projection head
                         optimizer_partial=partial(torch.optim.Adam, lr=1e-2),
                         lr_scheduler_partial=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.9))
    loader = es.coles_loader(data, data.train_idx, batch_size=8, split_count=2, cnt_min=5, cnt_max=15)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module, train_dataloaders=loader)
    trainer.save_checkpoint(tmp_path / "coles.ckpt")
    trained = module.state_dict()
    assert not torch.equal(before["_seq_encoder.seq_encoder.rnn.weight_hh_l0"],
                           trained["_seq_encoder.seq_encoder.rnn.weight_hh_l0"])

    model = es.build_model(data, head_hidden="8", **TINY)
    report = es.load_checkpoint(model, tmp_path / "coles.ckpt")
    assert report.prefix_map == {"_seq_encoder.": "encoder."}
    # TrxEncoder: 2 embeddings + batch norm (weight, bias, running mean/var, num_batches_tracked); GRU: starter + 4
    assert len(report.loaded) == 12 and not report.mismatched
    assert report.unexpected == ["_head.model.0.bias", "_head.model.0.weight"]  # the contrastive projection head
    assert report.missing == ["head.0.bias", "head.0.weight", "head.3.bias", "head.3.weight"]
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, trained[f"_seq_encoder.{key}"]), key
    x, _ = next(iter(data.batches(data.test_idx, batch_size=4)))
    module.eval(), model.eval()
    with torch.no_grad():
        assert torch.allclose(model.encoder(x), module(x))  # the same client embeddings as ptls's own module


def _long_data(tmp_path, lengths, *, max_seq_len):
    rng = np.random.default_rng(0)
    clients = [f"c{i:04d}" for i in range(len(lengths))]
    n = int(sum(lengths))
    events = pd.DataFrame({
        es.CLIENT: np.repeat(clients, lengths), es.TIME: np.concatenate([np.arange(k, dtype=float) for k in lengths]),
        "event_type": rng.choice(["a", "b", "c"], n), "amount": rng.exponential(10, n).round(2),
    })
    labels = pd.DataFrame({es.CLIENT: clients, es.TARGET: [f"k{i % 2}" for i in range(len(clients))]})
    return es.load(_write(tmp_path, events, labels), categorical_fields="event_type", max_seq_len=max_seq_len,
                   test_size=0.5, val_fraction=0)


class _PaddedSize:
    """Records the largest padded (batch x time) tensor the encoder was given."""

    def __init__(self, module):
        self.largest = 0
        module.register_forward_pre_hook(self)

    def __call__(self, _, args):
        self.largest = max(self.largest, int(args[0].payload["event_type"].numel()))


def test_one_client_with_ten_thousand_events(tmp_path):
    data = _long_data(tmp_path, [10_000, 30, 40, 50], max_seq_len=10_000)
    assert data.lengths.max() == 10_000 and data.notices["clients truncated to their last max_seq_len events"] == 0
    torch.manual_seed(0)
    model = es.build_model(data, **TINY)
    embeddings, _, _ = es.get_embeddings(model, data)
    assert np.isfinite(embeddings).all()
    truncated = _long_data(tmp_path, [10_000, 30, 40, 50], max_seq_len=1000)
    assert truncated.lengths.max() == 1000 and truncated.notices["clients truncated to their last max_seq_len events"] == 1
    np.testing.assert_array_equal(truncated.sequences[0][es.TIME], np.arange(9000, 10_000))


def test_a_batch_with_lengths_from_1_to_5000_stays_within_the_token_budget(tmp_path):
    lengths = np.unique(np.linspace(1, 5000, 40).astype(int))  # 1, 129, ..., 5000
    data = _long_data(tmp_path, lengths, max_seq_len=5000)
    assert data.lengths.min() == 1 and data.lengths.max() == 5000
    torch.manual_seed(0)
    model = es.build_model(data, **TINY)
    sizes = _PaddedSize(model.encoder)
    embeddings, _, _ = es.get_embeddings(model, data, max_tokens=12_000)
    # padding everything to 5000 would be 40 x 5000 = 200,000 events; length buckets keep each batch within budget
    assert sizes.largest <= 12_000 and np.isfinite(embeddings).all()
    for i in (0, len(lengths) - 1):
        one = es.get_embeddings(model, data, [i])[0]
        np.testing.assert_allclose(one[0], embeddings[i], rtol=1e-4, atol=1e-5)
    # training batches of the same clients: the loss is finite and backward runs
    x, y = next(iter(data.batches(np.arange(len(lengths)), batch_size=len(lengths))))
    loss = model.loss((x, torch.as_tensor(y)))
    loss.backward()
    assert torch.isfinite(loss)


def test_baseline_features_are_bag_of_types_plus_amount_statistics(data):
    features = es.baseline_features(data, data.test_idx[:3])
    n_types = len(data.vocab["event_type"]) - 1  # unknown + the seen types
    assert features.shape == (3, n_types + 1 + 7)
    np.testing.assert_allclose(features[:, :n_types].sum(1), 1.0)
    scores = es.baseline(data)
    assert 0 <= scores["accuracy"] <= 1


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=env)


@pytest.mark.slow
def test_notebook_tiny_run_under_papermill_equals_the_in_process_run(tiny_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_NUM_THREADS", "1")
    params = {"data_path": str(tiny_csv), "pretrain_epochs": 1, "epochs": 2, "freeze_epochs": 1, "hidden_size": 8,
              "head_hidden": "8", "label_fraction": 0.5, "amp": "bf16", "class_weights": "balanced", "save_top_k": 2}
    out = tmp_path / "papermill"
    env = {**os.environ, "WORKBENCH_CACHE": str(tmp_path / "cache_papermill")}
    proc = _cli(["run", str(NOTEBOOK), *[x for k, v in params.items() for x in ("-p", k, str(v))], "-o", str(out)], env)
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "final_metrics.json").read_text())
    assert set(es.WORKFLOW.headline_metrics) <= set(final) and {"probe_test_accuracy", "probe_test_macro_f1"} <= set(final)
    assert {p.name for p in (out / "figures").iterdir()} == {"training_curves.png", "lr_schedule.png",
                                                             "confusion_matrix.png", "embeddings.png"}
    saved = np.load(out / "embeddings.npz")
    assert saved["embeddings"].shape == (48, 8) and len(saved["client_ids"]) == 48
    report = json.loads((out / "load_report.json").read_text())
    assert report["prefix_map"] == {"_seq_encoder.": "encoder."}
    assert len(list((out / "checkpoints").glob("top-epoch*.safetensors"))) == 2

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache_in_process"))
    in_process = run_workflow(es.WORKFLOW, {**params, "output_dir": str(tmp_path / "in_process"), "interactive": False})
    assert in_process.final == final


def test_project_2d_and_plot_embedding():
    """The core pieces the notebook's embedding figure uses (workbench.metrics.project_2d, plots.plot_embedding)."""
    import workbench as wb

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (30, 5)), rng.normal(4, 1, (30, 5))])
    coords = wb.metrics.project_2d(x, seed=0)
    assert coords.shape == (60, 2) and abs(coords[:30, 0].mean() - coords[30:, 0].mean()) > 5  # PC 1 splits them
    assert wb.metrics.project_2d(x[:, :1]).shape == (60, 2)
    with pytest.raises(ValueError, match="NaN/inf"):
        wb.metrics.project_2d(np.full((3, 2), np.nan))
    fig = wb.plots.plot_embedding(coords, ["a"] * 30 + ["b"] * 30, title="two groups")
    ax = fig.axes[0]
    assert ax.get_title() == "two groups" and [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    with pytest.raises(ValueError, match=r"coords must have shape \(n, 2\)"):
        wb.plots.plot_embedding(x, ["a"] * 60)


def test_a_bare_ptls_encoder_state_dict_loads_under_the_encoder_prefix(data, tmp_path):
    torch.manual_seed(0)
    source = es.build_model(data, **TINY)
    torch.save(source.encoder.state_dict(), tmp_path / "encoder.pt")  # what a ptls user saves: seq_encoder.state_dict()
    model = es.build_model(data, head_hidden="", **TINY)
    report = es.load_checkpoint(model, es.pretrained(data, str(tmp_path / "encoder.pt")))
    assert report.prefix_map == {"": "encoder."} and len(report.loaded) == 12
    assert not report.unexpected and report.missing == ["head.0.bias", "head.0.weight"]
    assert all(torch.equal(v, source.encoder.state_dict()[k]) for k, v in model.encoder.state_dict().items())


def test_event_times_may_be_dates(tables, tmp_path, data):
    events, labels = tables[0].copy(), tables[1]
    events[es.TIME] = (pd.Timestamp("2024-01-01") + pd.to_timedelta(events[es.TIME], unit="D")).dt.strftime(
        "%Y-%m-%d %H:%M:%S")
    loaded = es.load(_write(tmp_path, events, labels), label_fraction=0.5, seed=0)
    np.testing.assert_allclose(loaded.sequences[0][es.TIME] - 19723, data.sequences[0][es.TIME], atol=1e-4)
    np.testing.assert_allclose(loaded.sequences[0]["time_gap"], data.sequences[0]["time_gap"], atol=1e-4)


def test_the_declaration_takes_the_cores_schedules_and_finetune_trains_any_of_them(data):
    """Issue 22: the task kept its own list (cosine | plateau | constant) and re-checked it; the core's is the one."""
    from workbench.schedules import SCHEDULES

    assert es.WORKFLOW.options("lr_scheduler_type") == (SCHEDULES, False)
    assert es.WORKFLOW.check({"lr_scheduler_type": "linear"})["lr_scheduler_type"] == "linear"
    torch.manual_seed(0)
    model = es.build_model(data, head_hidden="", **TINY)
    history = es.finetune(model, data, epochs=1, learning_rate=1e-3, batch_size=8, lr_scheduler_type="linear",
                          warmup_ratio=0.2, progress=False)
    assert np.isfinite(history.rows[0]["train_loss"])
    with pytest.raises(ValueError, match="lr_scheduler_type='cosin' is not one of constant, constant_with_warmup"):
        es.finetune(model, data, epochs=1, learning_rate=1e-3, lr_scheduler_type="cosin", progress=False)


def test_event_batches_shard_through_the_core_like_index_batches(data):
    """Issue 22: under --nproc fit shards train batches with .shard(rank, world_size); EventBatches had none."""
    from workbench.batches import IndexBatches

    batches = es.EventBatches(data, data.train_idx, batch_size=5, shuffle=True, seed=3)
    assert isinstance(batches, IndexBatches)
    ranks = [batches.shard(r, 2) for r in (0, 1)]
    assert ranks[0].generator is batches.generator  # fit checkpoints and restores this one RNG
    assert len(ranks[0]) == len(ranks[1]) == int(np.ceil(np.ceil(len(data.train_idx) / 2) / 5))
    seen = []
    for rank in ranks:
        rank.generator.manual_seed(3)  # every rank draws the same permutation
        seen += [client for x, y in rank for client in y.tolist()]
    assert len(seen) == 2 * int(np.ceil(len(data.train_idx) / 2))
    positions = []
    for rank in ranks:
        rank.generator.manual_seed(3)
        positions += [p for batch in rank.positions() for p in batch.tolist()]
    assert set(positions) == set(range(len(data.train_idx)))  # together, each client once (one repeated to pad)
    # one process: the same batches as before sharding existed (a permutation of torch's generator, in order)
    batches.generator.manual_seed(3)
    order = torch.randperm(len(data.train_idx), generator=torch.Generator().manual_seed(3)).numpy()
    assert np.array_equal(np.concatenate(batches.positions()), order)
    evaluation = es.EventBatches(data, data.test_idx, batch_size=4, max_tokens=200)
    shards = [evaluation.shard(r, 2) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == int(np.ceil(len(evaluation) / 2))
    assert set(np.concatenate([np.concatenate(s.positions()) for s in shards])) == set(range(len(data.test_idx)))


def _ptls_checkpoint(data, path, *, channel_width=16, hidden_size=8, rnn="gru"):
    """A CoLES checkpoint as ptls builds and Lightning saves it (``state_dict`` of ``_seq_encoder.*``), written
    with ptls's own classes: its channel embedding is ``channel_width`` wide."""
    from ptls.frames.coles import CoLESModule
    from ptls.nn import RnnSeqEncoder, TrxEncoder

    torch.manual_seed(1)
    trx = TrxEncoder(embeddings={"event_type": {"in": len(data.vocab["event_type"]), "out": 4},
                                 "channel": {"in": len(data.vocab["channel"]), "out": channel_width}},
                     numeric_values={"amount": "log", "time_gap": "identity"})
    module = CoLESModule(seq_encoder=RnnSeqEncoder(trx_encoder=trx, hidden_size=hidden_size, type=rnn,
                                                   is_reduce_sequence=True))
    torch.save({"epoch": 3, "global_step": 30, "state_dict": module.state_dict()}, path)
    return module


def test_a_ptls_checkpoint_decides_its_embedding_widths(data, tmp_path):
    """Issue 22: a ptls checkpoint with a 16-wide channel embedding loaded 10 of 12 tensors (the channel embedding
    and the GRU's input weights mismatched): the widths are not parameters, so the model is built to match."""
    import workbench as wb

    path = tmp_path / "wide.ckpt"
    module = _ptls_checkpoint(data, path)
    widths = es.checkpoint_widths(path, data, hidden_size=8)
    assert widths == {"event_type": 4, "channel": 16}
    model = es.build_model(data, embedding_sizes=widths, head_hidden="8", **TINY)
    report = es.load_checkpoint(model, path)
    assert len(report.loaded) == 12 and not report.mismatched and not report.unexpected
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, module.state_dict()[f"_seq_encoder.{key}"]), key
    assert es.embedding_sizes(model) == widths
    # what the notebook sets must agree with the checkpoint: the error names the parameter and its value
    with pytest.raises(ValueError, match=r"hidden_size=16 cannot load it. Set hidden_size=8 \(-p hidden_size 8\)"):
        es.checkpoint_widths(path, data, hidden_size=16)
    with pytest.raises(ValueError, match=r"holds a GRU encoder .* Set encoder_type='gru'"):
        es.checkpoint_widths(path, data, encoder_type="lstm", hidden_size=8)
    assert es.checkpoint_widths(None, data) == {}
    # a run folder keeps the widths: its predictor rebuilds the same model
    run = wb.Run(tmp_path / "run", params={"hidden_size": 8, "head_hidden": "8"})
    es.save_predictor(run, model, data)
    predictor = wb.predict.load_run(run.path)
    assert es.embedding_sizes(predictor.model) == widths


@pytest.mark.slow
def test_the_notebook_trains_on_two_ranks(tiny_csv, tmp_path):
    """Issue 22: `workbench run --nproc 2` raised ShardingError on the event batches; now each rank trains its share."""
    from workbench.checkpoints import load_state

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_NUM_THREADS": "1", "WORKBENCH_CACHE": str(tmp_path / "cache"),
           "WORKBENCH_DDP_TIMEOUT_S": "120"}
    params = {"data_path": str(tiny_csv), "pretrain_epochs": 1, "epochs": 2, "freeze_epochs": 1, "hidden_size": 8,
              "head_hidden": "8", "label_fraction": 0.5, "device": "cpu"}
    proc = _cli(["run", str(NOTEBOOK), "--nproc", "2", "--backend", "gloo",
                 *[x for k, v in params.items() for x in ("-p", k, str(v))], "-o", str(out)], env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["ok"] and status["world_size"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 alone wrote, one row per epoch
    assert load_state(out / "checkpoints" / "last.pt")["settings"]["world_size"] == 2
    assert set(es.WORKFLOW.headline_metrics) <= set(json.loads((out / "final_metrics.json").read_text()))
    assert len(list((tmp_path / "cache" / "pretrain").glob("*/pretrained.safetensors"))) == 1  # built once

