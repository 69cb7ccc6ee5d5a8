"""LR range test, gradient accumulation, layer-wise LR decay and EMA weights (issue 15)."""

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import workbench as wb
from workbench.checkpoints import load_state, read_state_dict
from workbench.lr_range import smooth, suggest_rates
from workbench.transfer import layer_prefixes, lr_ratios, param_groups

from .helpers import TinyNet, toy_loader


class PlainMLP(nn.Module):
    """No BatchNorm, no dropout: a batch's gradient is the sample-weighted sum of its parts' gradients."""

    def __init__(self, n_in: int = 10, n_hidden: int = 16, n_classes: int = 3, depth: int = 3):
        super().__init__()
        widths = [n_in] + [n_hidden] * depth
        self.blocks = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(n_hidden, n_classes)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)

    def loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- lr_find


def test_lr_find_leaves_model_optimizer_and_rng_bitwise_unchanged():
    torch.manual_seed(0)
    model = TinyNet(dropout=0.2)  # dropout draws from the RNG, BatchNorm updates buffers
    model.encoder[0].weight.requires_grad_(False)
    loader = toy_loader(shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for batch in loader:  # give the optimizer state (moments, step) and the params gradients
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    model.eval()
    weights, grads = _state(model), [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    opt_state = opt.state_dict()
    opt_before = {i: {k: v.clone() for k, v in s.items()} for i, s in opt_state["state"].items()}
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]]
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate(), loader.generator.get_state())

    result = wb.lr_find(model, loader, optimizer=opt, num_steps=30, start_lr=1e-5, end_lr=1.0)

    assert len(result.lrs) >= 3 and result.losses[0] != result.losses[-1]  # it did train
    _assert_equal_states(weights, _state(model))
    assert all((a is None and p.grad is None) or torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    assert not model.encoder[0].weight.requires_grad and not model.training
    after = opt.state_dict()
    assert [{k: v for k, v in g.items() if k != "params"} for g in after["param_groups"]] == groups_before
    for i, s in opt_before.items():
        for k, v in s.items():
            assert torch.equal(v, after["state"][i][k]), (i, k)
    assert torch.equal(rng[0], torch.get_rng_state())
    assert np.array_equal(rng[1], np.random.get_state()[1]) and rng[2] == random.getstate()
    assert torch.equal(rng[3], loader.generator.get_state())


def test_fit_after_lr_find_is_the_fit_without_it():
    def train(with_finder):
        torch.manual_seed(0)
        model = TinyNet(dropout=0.2)
        loader = toy_loader()
        if with_finder:
            wb.lr_find(model, loader, num_steps=20)
        wb.fit(model, loader, epochs=1, learning_rate=0.05, progress=False)
        return _state(model)

    _assert_equal_states(train(False), train(True))


def test_lr_find_result_faces_rules_and_plot():
    torch.manual_seed(0)
    result = wb.lr_find(PlainMLP(), toy_loader(), num_steps=40, suggest="minimum/10")
    assert result.rule == "minimum/10" and result.suggestion == result.suggestions["minimum/10"]
    assert set(result.suggestions) == {"steepest", "minimum/10", "valley"}
    frame = result.to_frame()
    assert list(frame.columns) == ["lr", "loss", "smoothed"] and frame["lr"].is_monotonic_increasing
    assert result.to_dict()["suggestion"] == result.suggestion and "minimum/10" in result._repr_html_()
    fig = wb.plots.plot_lr_find(result)
    assert fig.axes[0].get_xscale() == "log" and len(fig.axes[0].lines) == 5  # loss, smoothed, 3 rules
    with pytest.raises(ValueError, match="suggest='steep' is not one of steepest, minimum/10, valley"):
        wb.lr_find(PlainMLP(), toy_loader(), suggest="steep")


def test_suggestion_rules_on_a_known_curve():
    """Loss falls fastest at 1e-3 and bottoms out at 1e-1 (before it blows up)."""
    lrs = list(np.logspace(-6, 1, 71))
    x = np.log10(lrs)
    loss = 2 - np.tanh((x + 3) * 2) + np.where(x > -1, 10 * (x + 1) ** 2, 0)
    found = suggest_rates(lrs, list(loss), skip_start=0)
    assert found["steepest"] == pytest.approx(1e-3, rel=0.13)
    assert found["minimum/10"] == pytest.approx(1e-2, rel=0.3)
    # the loss falls from the first step to its minimum at 1e-1: valley is halfway, in log space
    assert found["valley"] == pytest.approx(10 ** ((-6 + -1) / 2), rel=0.2)
    # a bump inside the descent does not end the valley; the blow-up after the minimum does
    bumpy = [5.0, 4.0, 4.5, 3.0, 2.0, 1.0, 8.0, 9.0]
    assert suggest_rates(list(np.logspace(-5, 2, 8)), bumpy, skip_start=0)["valley"] == pytest.approx(
        np.logspace(-5, 2, 8)[2])  # longest fall: steps 0, 1, 3, 4, 5 -> halfway is step 2
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected: no start at 0


# --------------------------------------------------------------------------- gradient accumulation


def _accumulated(batch_size, accumulate, **kwargs):
    torch.manual_seed(0)
    model = PlainMLP()
    history = wb.fit(model, toy_loader(250, batch_size=batch_size, shuffle=True), epochs=2, learning_rate=0.01,
                     lr_scheduler_type="cosine", warmup_ratio=0.2, weight_decay=0.01, grad_clip=0.5,
                     accumulate=accumulate,
                     progress=False, **kwargs)
    return model, history


def test_accumulate_k_with_batch_b_over_k_gives_the_weights_of_batch_b():
    """250 samples: 7 batches of 32 + one of 26, against micro-batches of 8 (the last step: 8+8+8+2)."""
    big, h_big = _accumulated(32, 1)
    small, h_small = _accumulated(8, 4)
    for (name, a), b in zip(big.state_dict().items(), small.state_dict().values()):
        assert (a - b).abs().max().item() < 1e-6, name
    assert h_small.rows[-1]["step"] == h_big.rows[-1]["step"] == 16  # optimizer steps, not batches
    assert h_small.lr_trace == h_big.lr_trace  # the schedule counts optimizer steps too
    assert h_small.rows[-1]["train_loss"] == pytest.approx(h_big.rows[-1]["train_loss"], abs=1e-6)
    plain, _ = _accumulated(8, 1)  # the check is sharp: batch 8 without accumulation trains other weights
    assert (plain.head.weight - big.head.weight).abs().max().item() > 1e-3


def test_accumulate_is_checked_and_recorded_for_resume(tmp_path):
    with pytest.raises(ValueError, match="accumulate must be an integer >= 1"):
        wb.fit(PlainMLP(), toy_loader(), epochs=1, learning_rate=0.1, accumulate=0, progress=False)
    run = wb.Run(tmp_path / "r")
    wb.fit(PlainMLP(), toy_loader(), epochs=1, learning_rate=0.1, accumulate=3, run=run, progress=False)
    settings = load_state(run.checkpoints / "last.pt")["settings"]
    assert settings["accumulate"] == 3 and settings["steps_per_epoch"] == 3  # ceil(8 batches / 3)


# --------------------------------------------------------------------------- layer-wise LR decay


def test_layer_decay_is_geometric_with_depth_from_the_head():
    model = PlainMLP(depth=4)
    groups = param_groups(model, lr=1.0, layer_decay=0.5, backbone_lr_ratio=0.1)
    rates = lr_ratios(groups, lr=1.0)
    assert list(rates) == ["layer0", "layer1", "layer2", "layer3", "head"]
    assert rates == pytest.approx({"layer0": 0.1 * 0.5**4, "layer1": 0.1 * 0.5**3, "layer2": 0.1 * 0.5**2,
                                   "layer3": 0.1 * 0.5, "head": 1.0})  # backbone_lr_ratio multiplies
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in groups[0]["params"]] == ["blocks.0.weight"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert param_groups(model, lr=1.0) == param_groups(model, lr=1.0, layer_decay=None)


class Declared(PlainMLP):
    """A stem outside the stack and two blocks declared as one layer."""

    def __init__(self):
        super().__init__(depth=4)
        self.stem = nn.Linear(10, 10)

    def layer_groups(self):
        return [["blocks.0", "blocks.1"], "blocks.2", "blocks.3"]


def test_layer_groups_explicit_layers_stem_and_errors():
    model = Declared()
    assert layer_prefixes(model) == [["blocks.0", "blocks.1"], ["blocks.2"], ["blocks.3"]]
    rates = lr_ratios(param_groups(model, lr=1.0, layer_decay=0.5), lr=1.0)
    assert rates == pytest.approx({"stem": 0.5**4, "layer0": 0.5**3, "layer1": 0.25, "layer2": 0.5, "head": 1.0})
    explicit = lr_ratios(param_groups(model, lr=1.0, layer_decay=0.5, layers=["stem", "blocks"]), lr=1.0)
    assert explicit == pytest.approx({"layer0": 0.25, "layer1": 0.5, "head": 1.0})
    assert layer_prefixes(TinyNet()) == [["encoder.0"], ["encoder.1"]]  # the Sequential's layers with parameters
    with pytest.raises(ValueError, match="layer_groups"):
        param_groups(nn.Sequential(nn.Linear(2, 2)), lr=1.0, layer_decay=0.5)
    with pytest.raises(ValueError, match="'blockz' matches no parameter"):
        param_groups(model, lr=1.0, layer_decay=0.5, layers=["blockz"])
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
        param_groups(model, lr=1.0, layer_decay=1.5)


def test_layer_decay_composes_with_freezing_and_the_preview():
    """Frozen layers keep their group and rate; after freeze_epochs they train at their decayed rate."""
    torch.manual_seed(0)
    model = PlainMLP(depth=3)
    first = model.blocks[0].weight.detach().clone()
    seen = []

    class Watch(wb.Callback):
        def on_epoch_end(self, trainer, logs):
            seen.append(torch.equal(model.blocks[0].weight, first))

    history = wb.fit(model, toy_loader(), epochs=2, learning_rate=0.1, layer_decay=0.5, backbone_lr_ratio=0.5,
                     freeze_epochs=1, callbacks=[Watch()], progress=False)
    assert seen == [True, False]
    row = history.rows[-1]
    assert row["lr_layer0"] == pytest.approx(0.1 * 0.5 * 0.5**3) and row["lr_head"] == pytest.approx(0.1)
    curve = wb.lr_curve("cosine", learning_rate=0.1, total_steps=10,
                        groups=lr_ratios(param_groups(model, lr=0.1, layer_decay=0.5), lr=0.1))
    assert list(curve.columns) == ["layer0", "layer1", "layer2", "head"]
    assert len(wb.plots.plot_lr_schedule(curve).axes[0].lines) == 4  # one line per group


# --------------------------------------------------------------------------- EMA


def test_ema_shadow_is_the_moving_average_of_every_step(tmp_path):
    decay = 0.9
    torch.manual_seed(0)
    model = PlainMLP()
    expected = _state(model)

    steps = []
    record = lambda opt, args, kwargs: steps.append(_state(model))  # noqa: E731
    handle = register_optimizer_step_post_hook(record)
    try:
        history = wb.fit(model, toy_loader(), epochs=2, learning_rate=0.1, optimizer="sgd", ema=decay,
                         run=wb.Run(tmp_path / "r"), progress=False)
    finally:
        handle.remove()
    for state in steps:
        expected = {k: decay * expected[k] + (1 - decay) * state[k] for k in expected}
    assert len(steps) == 16
    for key, value in history.ema_weights.items():
        assert torch.allclose(value, expected[key], atol=1e-6), key
        assert not torch.equal(value, model.state_dict()[key])  # the model keeps its own weights (no ema_eval)
    exported = read_state_dict(tmp_path / "r" / "checkpoints" / "ema.safetensors")
    _assert_equal_states(exported, history.ema_weights)


def test_ema_eval_validates_and_checkpoints_the_shadow(tmp_path):
    torch.manual_seed(0)
    model = PlainMLP()
    val = toy_loader(64, seed=3, shuffle=False)
    history = wb.fit(model, toy_loader(), val_data=val, epochs=3, learning_rate=0.1, ema=0.8, ema_eval=True,
                     save_every=1,
                     run=wb.Run(tmp_path / "r"), progress=False)
    _assert_equal_states(_state(model), history.ema_weights)  # fit returns with the EMA weights
    model.eval()
    with torch.no_grad():
        val_loss = sum(model.loss(b).item() * len(b[0]) for b in val) / 64
    assert history.rows[-1]["val_loss"] == pytest.approx(val_loss, rel=1e-5)
    saved = read_state_dict(tmp_path / "r" / "checkpoints" / "epoch002.safetensors")  # checkpoints: the shadow
    _assert_equal_states(saved, history.ema_weights)
    last = load_state(tmp_path / "r" / "checkpoints" / "last.pt")
    assert not torch.equal(last["model"]["head.weight"], last["ema"]["shadow"]["head.weight"])
    with pytest.raises(ValueError, match="ema_eval=True evaluates the EMA weights, but ema is None"):
        wb.fit(PlainMLP(), toy_loader(), epochs=1, learning_rate=0.1, ema_eval=True, progress=False)


def test_cell_type_notebook_trains_at_the_lr_find_suggestion(tmp_path):
    """The notebook's optional cell (find_lr=True): the suggestion replaces learning_rate, and is recorded."""
    import json

    from workbench.execute import run_in_process
    from workbench.tasks import cell_type

    ns = run_in_process(cell_type.WORKFLOW.notebook, parameters={
        "epochs": 1, "pretrained_checkpoint": "none", "find_lr": True, "lr_scheduler_type": "constant",
        "interactive": False, "output_dir": str(tmp_path / "run")})
    recorded = json.loads((tmp_path / "run" / "lr_find.json").read_text())
    assert ns["learning_rate"] == recorded["suggestion"] == ns["found"].suggestion != 1.0e-3
    assert {lr for step in ns["history"].lr_trace for lr in step} == {recorded["suggestion"]}
    assert (tmp_path / "run" / "figures" / "lr_find.png").is_file()


def test_a_last_pt_from_before_these_settings_still_resumes(tmp_path):
    """last.pt files written before accumulate/layer_decay/ema existed read as their defaults (1, None, None, False)."""
    from workbench.checkpoints import save_state

    run = wb.Run(tmp_path / "r")
    wb.fit(PlainMLP(), toy_loader(), epochs=1, learning_rate=0.1, run=run, progress=False)
    path = run.checkpoints / "last.pt"
    state = load_state(path)
    for key in ("accumulate", "layer_decay", "ema", "ema_eval"):
        del state["settings"][key]
    save_state(state, path)
    history = wb.fit(PlainMLP(), toy_loader(), epochs=1, learning_rate=0.1, run=wb.Run(tmp_path / "r", resume=True),
                     resume=True,
                     progress=False)  # accepted: the finished run's history comes back
    assert [r["epoch"] for r in history.rows] == [0]
    with pytest.raises(ValueError, match="accumulate: 1 saved, 2 now"):
        wb.fit(PlainMLP(), toy_loader(), epochs=1, learning_rate=0.1, accumulate=2,
               run=wb.Run(tmp_path / "r", resume=True),
               resume=True, progress=False)
