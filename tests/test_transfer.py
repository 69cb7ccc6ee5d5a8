import warnings

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.transfer import LoadError, apply_strategy, head_prefixes, load_pretrained, param_groups, unwrap

from .helpers import (
    AutoEncoder,
    ClassifierChildNet,
    HeadFirstNet,
    MlpHeadNet,
    NoAffineBatchNormNet,
    PosEmbedNet,
    ProjectorNet,
    TimmStyleNet,
    TinyNet,
    TwinEncoderNet,
    toy_loader,
)


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


def test_a_named_strategy_never_freezes_a_tensor_the_checkpoint_did_not_load(tmp_path):
    """Issue 21 item 9: a tensor skipped for its shape (or missing) stays trainable and the report says so."""
    torch.manual_seed(0)
    state = TinyNet(n_in=10).state_dict()
    del state["encoder.1.weight"]  # the BatchNorm's scale is missing from the checkpoint
    path = wb.save_weights(state, tmp_path / "pre.safetensors")
    model = TinyNet(n_in=12)  # another input width: encoder.0.weight is skipped for its shape
    report = load_pretrained(model, path)
    assert report.not_loaded == {"encoder.0.weight": "shape (32, 10) in the checkpoint, (32, 12) here",
                                 "encoder.1.weight": "not in the checkpoint"}
    assert wb.transfer.not_loaded(nn.DataParallel(model)) == report.not_loaded

    freeze = apply_strategy(model, "frozen_backbone")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"encoder.0.weight", "encoder.1.weight", "head.weight", "head.bias"}
    assert set(freeze.kept_trainable) == {"encoder.0.weight", "encoder.1.weight"}
    assert "kept trainable, not loaded from the checkpoint (at initialisation): encoder.0.weight (shape (32, 10)" in \
        freeze.summary()
    frame = freeze.to_frame().set_index("module")
    assert frame.loc["encoder", "kept_trainable"] == 32 * 12 + 32 and frame.loc["head", "kept_trainable"] == 0
    assert freeze.to_dict()["kept_trainable"]["encoder.1.weight"] == "not in the checkpoint"
    assert not model.encoder[1].__dict__.get("_workbench_eval_hook")  # its statistics train with its scale

    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = wb.fit(model, toy_loader(n_in=12), epochs=1, learning_rate=0.05, strategy="frozen_backbone",
                     progress=False)
    after = model.state_dict()
    assert not torch.equal(before["encoder.0.weight"], after["encoder.0.weight"])
    assert torch.equal(before["encoder.0.bias"], after["encoder.0.bias"])  # loaded: frozen as asked
    assert history is not None

    # a list of prefixes freezes what it names, and the report says which of them were never loaded
    listed = apply_strategy(model, ["encoder"])
    assert not model.encoder[0].weight.requires_grad and set(listed.frozen_not_loaded) == {"encoder.0.weight",
                                                                                           "encoder.1.weight"}
    # a later load that fills them clears the record
    load_pretrained(model, TinyNet(n_in=12).state_dict())
    assert wb.transfer.not_loaded(model) == {} and not apply_strategy(model, "frozen_backbone").kept_trainable
    assert not model.encoder[0].weight.requires_grad


def test_frozen_backbone_training_leaves_frozen_tensors_and_bn_stats_bitwise_unchanged():
    torch.manual_seed(0)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wb.fit(model, toy_loader(), epochs=2, learning_rate=0.05, weight_decay=0.1, strategy="frozen_backbone",
           progress=False)
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

    wb.fit(model, toy_loader(), epochs=3, learning_rate=0.05, freeze_epochs=1, callbacks=[Probe()], progress=False)
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


# --------------------------------------------------------------------------- wrapped models


def _split(model: nn.Module) -> tuple[set[str], set[str]]:
    """(trainable, frozen) parameter names of ``model``."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return trainable, frozen


def _group_names(groups: list[dict], model: nn.Module) -> dict[str, set[str]]:
    """``{group name: parameter names}``, naming parameters as ``model`` (the user's module) names them."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {name_of[id(p)] for p in g["params"]} for g in groups}


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_dataparallel_frozen_backbone_freezes_the_encoder_and_groups_split_head_from_backbone():
    model = TinyNet()
    wrapped = nn.DataParallel(model)  # without GPUs it only wraps
    apply_strategy(wrapped, "frozen_backbone")
    encoder = {"encoder.0.weight", "encoder.0.bias", "encoder.1.weight", "encoder.1.bias"}
    assert _split(model) == ({"head.weight", "head.bias"}, encoder)
    groups = _group_names(param_groups(wrapped, lr=1e-3, backbone_lr_ratio=0.1), model)
    assert groups["head"] | groups["head_no_decay"] == {"head.weight", "head.bias"}


def _wrap(kind: str, model: nn.Module) -> nn.Module:
    if kind == "dataparallel":
        return nn.DataParallel(model)
    if kind == "compile":
        return torch.compile(model)  # an OptimizedModule; compiles only on the first forward, which we never call
    if kind == "compile_of_dataparallel":
        return torch.compile(nn.DataParallel(model))
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["dataparallel", "compile", "compile_of_dataparallel"])
@pytest.mark.parametrize("strategy", ["frozen_backbone", "linear_probe"])
def test_wrapped_model_freezes_and_groups_like_the_unwrapped_model(kind, strategy):
    plain, inner = MlpHeadNet(), MlpHeadNet()
    apply_strategy(plain, strategy)
    apply_strategy(_wrap(kind, inner), strategy)
    assert _split(inner) == _split(plain)
    expected_trainable = {"frozen_backbone": {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"},
                          "linear_probe": {"head.2.weight", "head.2.bias"}}[strategy]
    assert _split(inner)[0] == expected_trainable
    wrapped_groups = param_groups(_wrap(kind, inner), lr=1e-3, weight_decay=0.01, backbone_lr_ratio=0.1)
    plain_groups = param_groups(plain, lr=1e-3, weight_decay=0.01, backbone_lr_ratio=0.1)
    assert _group_names(wrapped_groups, inner) == _group_names(plain_groups, plain)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in wrapped_groups] == [
        (g["name"], g["lr"], g["weight_decay"]) for g in plain_groups
    ]


def test_unwrap_peels_nested_wrappers_and_leaves_plain_models_alone():
    model = TinyNet()
    assert unwrap(model) is model
    assert unwrap(nn.DataParallel(model)) is model
    assert unwrap(torch.compile(nn.DataParallel(model))) is model
    assert unwrap(nn.DataParallel(torch.compile(model))) is model
    assert "unwrap" in wb.transfer.__all__

    class HasModuleAttribute(nn.Module):  # a user model that merely has a child called "module"
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.head = nn.Linear(2, 2)

    own = HasModuleAttribute()
    assert unwrap(own) is own


def test_distributed_data_parallel_is_unwrapped(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = MlpHeadNet()
        apply_strategy(nn.parallel.DistributedDataParallel(model), "frozen_backbone")
        assert _split(model)[0] == {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["frozen_backbone", "linear_probe"])
def test_peft_lora_model_freezes_and_groups_by_the_user_model_names(strategy):
    peft = pytest.importorskip("peft")
    inner = MlpHeadNet()
    wrapped = peft.get_peft_model(inner, peft.LoraConfig(r=4, target_modules=["encoder.0"]))
    lora = {"encoder.0.lora_A.default.weight", "encoder.0.lora_B.default.weight"}
    assert lora <= {n for n, _ in inner.named_parameters()}
    # The LoRA adapters live inside the backbone (encoder.0), so they are backbone tensors: frozen_backbone
    # and linear_probe freeze them like every other backbone tensor, and param_groups gives them the
    # backbone learning rate. Training adapters + head only is a different recipe, spelled as a list of
    # prefixes to freeze (e.g. ["encoder.0.base_layer", "encoder.1"]).
    apply_strategy(wrapped, strategy)
    head = {"frozen_backbone": {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"},
            "linear_probe": {"head.2.weight", "head.2.bias"}}[strategy]
    everything = {n for n, _ in inner.named_parameters()}
    assert _split(inner) == (head, everything - head)
    groups = _group_names(param_groups(wrapped, lr=1e-3, weight_decay=0.01, backbone_lr_ratio=0.1), inner)
    assert groups["head"] | groups["head_no_decay"] == {n for n in everything if n.startswith("head.")}
    assert lora <= groups["backbone"]
    assert groups["backbone"] | groups["backbone_no_decay"] == {n for n in everything if n.startswith("encoder.")}


def test_peft_lora_on_the_head_linear_probe_trains_the_whole_adapted_layer():
    peft = pytest.importorskip("peft")
    inner = MlpHeadNet()
    wrapped = peft.get_peft_model(inner, peft.LoraConfig(r=4, target_modules=["encoder.0", "head.2"]))
    apply_strategy(wrapped, "linear_probe")
    # head.2 is now peft's LoRA layer around the original nn.Linear: the probe trains all of it,
    # not just the last small nn.Linear inside it (lora_B).
    assert _trainable(inner) == {
        "head.2.base_layer.weight",
        "head.2.base_layer.bias",
        "head.2.lora_A.default.weight",
        "head.2.lora_B.default.weight",
    }


@pytest.mark.parametrize("kind", ["dataparallel", "compile"])
def test_load_pretrained_into_a_wrapped_model_reports_the_user_model_names(kind):
    source, inner = TinyNet(), TinyNet()
    report = load_pretrained(_wrap(kind, inner), source.state_dict())
    assert report.prefix_map == {}
    assert report.loaded == sorted(source.state_dict())
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(inner.encoder[0].weight, source.encoder[0].weight)


# --------------------------------------------------------------------------- statistics of parameterless norms


def _train_a_few_steps(model: nn.Module, strategy) -> None:
    apply_strategy(model, strategy)
    model.train()  # a parent .train() call, as every training loop makes
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for x, y in toy_loader(n=96):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("strategy", ["frozen_backbone", "full"])
def test_batchnorm_without_affine_keeps_its_statistics_only_when_frozen(strategy):
    torch.manual_seed(0)
    model = NoAffineBatchNormNet()
    before = {k: v.clone() for k, v in model.encoder[1].state_dict().items()}
    assert set(before) == {"running_mean", "running_var", "num_batches_tracked"}
    _train_a_few_steps(model, strategy)
    after = model.encoder[1].state_dict()
    for key in before:
        if strategy == "frozen_backbone":
            assert torch.equal(before[key], after[key]), key
        else:
            assert not torch.equal(before[key], after[key]), key


def test_batchnorm_without_affine_follows_its_nearest_parameter_holding_parent():
    torch.manual_seed(0)
    model = NoAffineBatchNormNet()
    before = model.encoder[1].running_mean.clone()
    report = apply_strategy(model, ["encoder.0"])  # all of encoder's parameters frozen -> its BN too
    assert report.to_frame().set_index("module").loc["encoder", "norm_stats_frozen"]
    _train_a_few_steps(model, ["encoder.0"])
    assert torch.equal(before, model.encoder[1].running_mean)

    model = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8, affine=False), nn.Linear(8, 3))
    model.head_prefixes = ("2",)
    before = model[1].running_mean.clone()
    _train_a_few_steps(model, ["0"])  # the parent (the model) still trains layer 2: BN keeps learning
    assert not torch.equal(before, model[1].running_mean)


# --------------------------------------------------------------------------- prefix detection


def test_prefix_detection_counts_a_key_only_when_its_shape_fits_too():
    source = TwinEncoderNet()
    ckpt = {f"net.{k}": v for k, v in source.encoder.state_dict().items()}  # net.0.weight (32, 10), net.0.bias
    model = TwinEncoderNet()
    # by name alone, "net." -> "backbone." fits as well as "net." -> "encoder." (backbone.0 takes 4 inputs, not 10)
    report = load_pretrained(model, ckpt)
    assert report.prefix_map == {"net.": "encoder."}
    assert report.loaded == ["encoder.0.bias", "encoder.0.weight"] and not report.mismatched
    assert torch.equal(model.encoder[0].weight, source.encoder[0].weight)


def test_prefix_detection_refuses_a_prefix_that_loads_nothing():
    ckpt = {"net.0.weight": torch.zeros(5, 5), "net.0.bias": torch.zeros(5)}  # names fit TinyNet.encoder, shapes don't
    with pytest.raises(LoadError, match="key_map=") as info:
        load_pretrained(TinyNet(), ckpt)
    message = str(info.value)
    assert "'net.' -> 'encoder.' loads 0" in message and "loads nothing" in message


def test_prefix_detection_refuses_to_guess_between_equally_good_prefixes():
    source = TwinEncoderNet(backbone_in=10)  # backbone.0 and encoder.0 now have the same shapes
    ckpt = {f"net.{k}": v for k, v in source.encoder.state_dict().items()}
    with pytest.raises(LoadError, match="key_map=") as info:
        load_pretrained(TwinEncoderNet(backbone_in=10), ckpt)
    message = str(info.value)
    assert "'net.' -> 'backbone.' loads 2" in message and "'net.' -> 'encoder.' loads 2" in message
    # naming the map explicitly settles it
    report = load_pretrained(TwinEncoderNet(backbone_in=10), ckpt, key_map={"net.": "encoder."})
    assert report.loaded == ["encoder.0.bias", "encoder.0.weight"]


# --------------------------------------------------------------------------- linear_probe finds the declared head


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (HeadFirstNet, {"head.weight", "head.bias"}),
        (ProjectorNet, {"head.weight", "head.bias"}),
        (TimmStyleNet, {"out.weight", "out.bias"}),
        (ClassifierChildNet, {"classifier.2.weight", "classifier.2.bias"}),
    ],
    ids=["head_registered_first", "projector_after_head", "get_classifier", "classifier_child"],
)
def test_linear_probe_trains_the_last_linear_of_the_declared_head(make, expected):
    model = make()
    apply_strategy(model, "linear_probe")
    assert _trainable(model) == expected


def test_linear_probe_uses_declared_head_prefixes():
    model = ProjectorNet()
    model.head_prefixes = ("projector",)
    apply_strategy(model, "linear_probe")
    assert _trainable(model) == {"projector.weight", "projector.bias"}


def test_head_prefixes_looks_for_get_classifier_classifier_and_fc_before_the_last_child():
    assert head_prefixes(TimmStyleNet()) == ("out",)
    assert head_prefixes(ClassifierChildNet()) == ("classifier",)
    fc_net = nn.Module()
    fc_net.fc = nn.Linear(2, 2)
    fc_net.extra = nn.Linear(2, 2)
    assert head_prefixes(fc_net) == ("fc",)
    assert head_prefixes(AutoEncoder()) == ("decoder",)  # unchanged fallback: the last child


def test_linear_probe_without_a_head_says_what_it_looked_for():
    with pytest.raises(ValueError, match="linear_probe") as info:
        apply_strategy(AutoEncoder(), "linear_probe")
    message = str(info.value)
    assert "head_prefixes" in message and "get_classifier" in message and "list of prefixes" in message


# --------------------------------------------------------------------------- weight decay


def test_no_weight_decay_names_from_the_model_get_no_decay():
    model = PosEmbedNet()
    groups = param_groups(model, lr=1e-3, weight_decay=0.05, backbone_lr_ratio=0.1)
    names = _group_names(groups, model)
    by_name = {g["name"]: g for g in groups}
    assert {"pos_embed", "tok.weight"} <= names["backbone_no_decay"]
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0
    assert names["backbone"] == {"mixer.weight"} and by_name["backbone"]["weight_decay"] == 0.05


def test_linear_probe_with_a_head_without_linear_layers_says_so():
    model = nn.Module()
    model.encoder = nn.Linear(4, 4)
    model.head = nn.Conv1d(4, 2, 1)
    with pytest.raises(ValueError, match="holds no nn.Linear") as info:
        apply_strategy(model, "linear_probe")
    assert "frozen_backbone" in str(info.value)
