import math

import pytest
import torch

from workbench.schedules import SCHEDULES, build_scheduler, lr_curve


def test_cosine_with_warmup_and_floor():
    curve = lr_curve("cosine", learning_rate=1.0, total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    lr = curve["lr"].to_numpy()
    assert curve.attrs == {"schedule": "cosine", "warmup_steps": 10, "total_steps": 100, "freeze_steps": 0}
    assert lr[0] == pytest.approx(1 / 11) and lr[9] == pytest.approx(10 / 11)
    assert lr[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert lr[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))


@pytest.mark.parametrize("name", [s for s in SCHEDULES if s != "plateau"])
def test_every_step_schedule_starts_positive_and_never_exceeds_base(name):
    lr = lr_curve(name, learning_rate=0.5, total_steps=60, warmup_ratio=0.2)["lr"]
    assert (lr > 0).all() and (lr <= 0.5 + 1e-12).all()


def test_constant_is_flat_and_step_decays_by_gamma():
    assert set(lr_curve("constant", learning_rate=0.1, total_steps=10)["lr"]) == {0.1}
    lr = lr_curve("step", learning_rate=1.0, total_steps=9, step_every=3, gamma=0.5)["lr"].tolist()
    assert lr == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]


def test_groups_with_multipliers():
    curve = lr_curve("linear", learning_rate=1e-3, total_steps=20, groups={"backbone": 0.1, "head": 1.0})
    assert list(curve.columns) == ["backbone", "head"]
    assert (curve["backbone"] / curve["head"]).round(12).eq(0.1).all()


def test_unknown_name_lists_the_valid_ones():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError) as info:
        build_scheduler(opt, "cosin", total_steps=10)
    text = str(info.value)
    assert "'cosin' is not one of constant, constant_with_warmup, cosine, linear, step, plateau" in text
    assert "Did you mean 'cosine'" in text


def test_plateau_is_reduce_on_plateau():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = build_scheduler(opt, "plateau", total_steps=10, patience=0, factor=0.5)
    sched.step(1.0)
    sched.step(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_constant_applies_describes_and_plots_the_same_warmup():
    """Issue 17 D11: 'constant' ignored warmup_ratio while describe() and the preview reported warmup steps."""
    from workbench.schedules import describe

    curve = lr_curve("constant", learning_rate=0.1, total_steps=20, warmup_ratio=0.1)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = build_scheduler(opt, "constant", total_steps=20, warmup_ratio=0.1)
    applied = []
    for _ in range(20):
        applied.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert applied == curve["lr"].tolist() == [0.1] * 20
    assert curve.attrs["warmup_steps"] == 0
    assert "warmup_steps=0" in describe(sched)
    # the schedule that does warm up says so in all three places
    warm = lr_curve("constant_with_warmup", learning_rate=0.1, total_steps=20, warmup_ratio=0.1)
    assert warm.attrs["warmup_steps"] == 2 and warm["lr"].iloc[0] < 0.1


def test_preview_marks_the_frozen_backbone_phase():
    curve = lr_curve("cosine", learning_rate=1.0, total_steps=20, warmup_ratio=0.1,
                     groups={"backbone": 0.1, "head": 1.0}, freeze_steps=5)
    assert curve["backbone"].iloc[:5].isna().all() and curve["backbone"].iloc[5:].notna().all()
    assert curve["head"].notna().all() and curve.attrs["freeze_steps"] == 5
    from workbench.plots import plot_lr_schedule

    fig = plot_lr_schedule(curve)
    assert "backbone frozen 5" in fig.axes[0].get_title()
    assert [line.get_label() for line in fig.axes[0].get_lines()][:2] == ["backbone", "head"]


def test_lr_curve_takes_learning_rate_and_the_old_lr_with_a_warning():
    """One vocabulary with fit and the notebooks: learning_rate; lr= still works for now and gives the same curve."""
    new = lr_curve("cosine", learning_rate=0.5, total_steps=30, warmup_ratio=0.2)
    with pytest.warns(DeprecationWarning, match="now called learning_rate"):
        old = lr_curve("cosine", lr=0.5, total_steps=30, warmup_ratio=0.2)
    assert new.equals(old) and new.attrs == old.attrs
    with pytest.raises(TypeError, match="both lr= and learning_rate="):
        lr_curve("cosine", lr=0.5, learning_rate=0.5, total_steps=30)
