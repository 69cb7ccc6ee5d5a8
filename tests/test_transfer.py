import warnings

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.transfer import LoadError, apply_strategy, load_pretrained, param_groups

from .helpers import TinyNet, toy_loader


def _dp_checkpoint(n_classes=5):
    """What a DataParallel-trained model with another head size saves, plus a stray key."""
    state = {f"module.{k}": v for k, v in TinyNet(n_classes=n_classes).state_dict().items()}
    state["module.projector.weight"] = torch.zeros(4, 4)
    return state


def test_load_report_lists_exactly_the_mismatch_and_extra_key_and_detects_prefix(tmp_path):
    path = wb.save_weights(_dp_checkpoint(), tmp_path / "pre.safetensors")
    model = TinyNet(n_classes=3)
    report = load_pretrained(model, path)
    assert report.prefix_map == {"module.": ""}
    assert report.mismatched == {"head.weight": ((5, 32), (3, 32)), "head.bias": ((5,), (3,))}
    assert report.unexpected == ["projector.weight"]
    assert report.missing == []
    assert set(report.loaded) == set(model.state_dict()) - {"head.weight", "head.bias"}
    n_head = 32 * 3 + 3
    total = sum(p.numel() for p in model.parameters())
    assert report.loaded_fraction == pytest.approx((total - n_head) / total)
    # the three faces
    frame = report.to_frame()
    assert set(frame.query("status == 'mismatched'").key) == {"head.weight", "head.bias"}
    assert report.to_dict()["mismatched"]["head.weight"] == {"checkpoint": [5, 32], "model": [3, 32]}
    assert "projector.weight" in report._repr_html_()


def test_loaded_tensors_are_the_checkpoint_values():
    source = TinyNet(n_classes=5)
    model = TinyNet(n_classes=3)
    load_pretrained(model, {f"model.{k}": v for k, v in source.state_dict().items()})
    assert torch.equal(model.encoder[0].weight, source.encoder[0].weight)
    assert torch.equal(model.encoder[1].running_mean, source.encoder[1].running_mean)
    assert not torch.equal(model.head.bias[:3], source.head.bias[:3])


def test_expect_missing_accepts_declared_and_raises_on_others(tmp_path):
    run = wb.Run(tmp_path / "run")
    load_pretrained(TinyNet(n_classes=3), _dp_checkpoint(), expect_missing=["head.*"], run=run)
    assert (tmp_path / "run" / "load_report.json").exists()
    state = _dp_checkpoint(n_classes=3)
    del state["module.encoder.0.bias"]
    with pytest.raises(LoadError, match=r"encoder\.0\.bias") as info:
        load_pretrained(TinyNet(n_classes=3), state, expect_missing=["head.*"])
    assert "expect_missing" in str(info.value) and "key_map" in str(info.value)


def test_explicit_key_map_for_an_encoder_only_checkpoint():
    encoder = TinyNet().encoder
    report = load_pretrained(TinyNet(), {f"enc.{k}": v for k, v in encoder.state_dict().items()}, key_map={"enc.": "encoder."})
    assert report.missing == ["head.bias", "head.weight"] and not report.unexpected


def test_frozen_backbone_training_leaves_frozen_tensors_and_bn_stats_bitwise_unchanged():
    torch.manual_seed(0)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wb.fit(model, toy_loader(), epochs=2, lr=0.05, weight_decay=0.1, strategy="frozen_backbone", progress=False)
    after = model.state_dict()
    for key in before:
        if key.startswith("encoder."):
            assert torch.equal(before[key], after[key]), key  # weights, bias, running_mean/var, num_batches_tracked
        else:
            assert not torch.equal(before[key], after[key]), key
    model.train()  # a parent .train() must not wake the frozen BatchNorm up
    model(torch.randn(8, 10))
    assert torch.equal(before["encoder.1.running_mean"], model.state_dict()["encoder.1.running_mean"])


def test_freeze_epochs_then_unfreeze_trains_the_backbone():
    torch.manual_seed(0)
    model = TinyNet()
    w0 = model.encoder[0].weight.detach().clone()
    seen = []

    class Probe(wb.Callback):
        def on_epoch_end(self, trainer, logs):
            seen.append(torch.equal(trainer.model.encoder[0].weight, w0))

    wb.fit(model, toy_loader(), epochs=3, lr=0.05, freeze_epochs=1, callbacks=[Probe()], progress=False)
    assert seen == [True, False, False]


def test_unknown_strategy_and_nothing_trainable_errors():
    with pytest.raises(ValueError, match="is not one of") as info:
        apply_strategy(TinyNet(), "frozen_everything")
    assert "frozen_backbone" in str(info.value) and "list of module-name prefixes" in str(info.value)
    with pytest.raises(ValueError, match="No trainable parameters") as info:
        apply_strategy(TinyNet(), ["encoder", "head"])
    assert "froze every module" in str(info.value)


def test_freeze_that_freezes_nothing_warns():
    with pytest.warns(UserWarning, match="froze nothing"):
        apply_strategy(TinyNet(), ["decoder"])


def test_linear_probe_and_custom_model_strategies():
    model = TinyNet()
    report = apply_strategy(model, "linear_probe")
    assert report.trainable == 32 * 3 + 3
    model.strategies = {"frozen_encoder_linear": ["encoder.0"]}
    report = apply_strategy(model, "frozen_encoder_linear")
    assert not model.encoder[0].weight.requires_grad and model.encoder[1].weight.requires_grad
    assert "frozen_encoder_linear" in report.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_strategy(model, "full")
    assert all(p.requires_grad for p in model.parameters())


def test_param_groups_cover_every_parameter_with_discriminative_lr_and_no_decay_on_1d():
    model = TinyNet()
    apply_strategy(model, "frozen_backbone")
    groups = param_groups(model, lr=1e-3, weight_decay=0.01, backbone_lr_ratio=0.1)
    by_name = {g["name"]: g for g in groups}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert by_name["backbone"]["lr"] == pytest.approx(1e-4) and by_name["head"]["lr"] == 1e-3
    assert by_name["head_no_decay"]["weight_decay"] == 0.0 and by_name["backbone"]["weight_decay"] == 0.01
