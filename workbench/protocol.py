"""The evaluation protocol, in the core: the steps every workflow takes in the same order, written once.

1. **Split** train / validation / test (by group where the data has groups): :mod:`workbench.splits`.
2. **Pretraining through the cache** (:func:`pretrain`): the checkpoint a self-supervised or source-task objective
   writes, cached under a key derived from what the build reads (the data's content hash, the exact rows, the
   settings, the workflow's code), resolved from the ``pretrained_checkpoint`` parameter (:func:`pretrained`).
3. **Fit** with the best epoch (by ``monitor`` on the validation samples) restored, always: :func:`workbench.fit`.
4. **Baseline on exactly the model's training samples** (:func:`fit_baseline`): logistic regression for a class,
   ridge for a number, on the task's baseline features of the same rows the model was fit on.
5. **One evaluation code for model and baseline** (:func:`evaluate`): both predictions are scored by the same
   function, the result is an :class:`Evaluation` with three faces (``_repr_html_``, ``to_frame()``,
   ``to_dict()``), and the run's ``final_metrics.json`` is written from it, with ``n_train`` and
   ``baseline_n_train`` saying how many samples each was fit on.

A workflow supplies its data (loaders, simulator), its model, its pretraining objective (a model whose ``loss`` is
the objective, and its batches), its baseline's features and its figures; nothing of the above.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .metrics import Evaluation

__all__ = ["pretrain", "pretrained", "fit_baseline", "evaluate", "Evaluation"]


def pretrain(workflow: str, objective: str, *, reads: Sequence, settings: Mapping, model: Callable[[], object],
             batches: Callable[[], Iterable], epochs: int, learning_rate: float, seed: int = 0,
             weight_decay: float = 0.0, lr_scheduler_type: str = "cosine", warmup_ratio: float = 0.05,
             code: str | Sequence[str] = (), metadata: Mapping | None = None, describe: Mapping | None = None,
             fit_options: Mapping | None = None, device="auto", dtype=None, progress: bool = True,
             cache_root=None) -> Path:
    """Pretrain ``model()`` on ``batches()`` with its own loss (the objective); return ``pretrained.safetensors``.

    Cached (:func:`workbench.cache.cached`, kind ``pretrain``): the key is the fingerprint of ``reads`` (what the
    build reads: the data's content hash, the exact rows, vocabularies), ``settings`` (architecture and pretraining
    settings) with the objective, seed, epochs, learning rate and placement, and the source of the workbench core and
    of the modules named in ``code``. An entry is reused only when all are equal; an interrupted build resumes from
    its own ``last.pt``. The checkpoint's metadata holds the workflow, the objective, the fingerprint, ``metadata``
    (e.g. the genes, for loading by name) and the settings.

    ``model`` and ``batches`` are called inside the build (after ``torch.manual_seed(seed)``), so a cache hit costs
    neither. ``fit_options`` are further :func:`workbench.fit` settings (e.g. ``seed``, ``callbacks``).
    """
    import torch

    from .cache import cached, code_version, fingerprint
    from .checkpoints import save_weights
    from .devices import placement_key

    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    settings.update(seed=seed, objective=objective, **placement_key(device, dtype))
    modules = (code,) if isinstance(code, str) else tuple(code)
    key = fingerprint(*reads, settings, epochs, learning_rate, weight_decay, lr_scheduler_type, warmup_ratio,
                      *(code_version(m) for m in modules or (__name__,)))

    def build(folder: Path) -> None:
        from .tracking import Run
        from .training import fit

        torch.manual_seed(seed)
        net = model()
        run = Run(folder / "run", params=settings, resume=True)
        fit(net, batches(), epochs=epochs, learning_rate=learning_rate, weight_decay=weight_decay,
            lr_scheduler_type=lr_scheduler_type, warmup_ratio=warmup_ratio, run=run, resume=True, progress=progress,
            log_every=100, device=device, dtype=dtype, **dict(fit_options or {}))
        meta = {"task": workflow, "objective": objective, "fingerprint": key, **dict(metadata or {}), **settings}
        save_weights(net, folder / "pretrained.safetensors", metadata=meta)

    return cached("pretrain", key, build, root=cache_root, describe={**dict(describe or {}), **settings}) \
        / "pretrained.safetensors"


def pretrained(pretrained_checkpoint: str, **pretraining) -> Path | str | None:
    """Resolve the ``pretrained_checkpoint`` parameter: ``"pretrain"`` runs :func:`pretrain` (``**pretraining``,
    cached), ``"none"`` gives None (from scratch), anything else is a checkpoint path that must exist."""
    from .checkpoints import resolve_pretrained

    return resolve_pretrained(pretrained_checkpoint, lambda: pretrain(**pretraining))


def fit_baseline(X, y, *, kind: str = "logistic", seed: int = 0, scale: bool = True, max_iter: int = 2000,
                 alphas=None):
    """The baseline, fit on the rows the model was fit on: ``kind="logistic"`` (classes) or ``"ridge"`` (numbers).

    Logistic regression (lbfgs, ``random_state=seed``), after a StandardScaler unless ``scale=False``; ridge
    regression with its penalty chosen by efficient leave-one-out over ``alphas`` (default ``10**[-2, 3]``, 12
    values). Returns the fitted scikit-learn estimator (``predict``, and ``predict_proba`` for classes).
    """
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        estimator = LogisticRegression(max_iter=max_iter, random_state=seed)
    elif kind == "ridge":
        from sklearn.linear_model import RidgeCV

        estimator = RidgeCV(alphas=np.logspace(-2, 3, 12) if alphas is None else alphas)
    else:
        raise ValueError(f"kind={kind!r} is not a baseline; use 'logistic' (classes) or 'ridge' (numbers).")
    return (make_pipeline(StandardScaler(), estimator) if scale else estimator).fit(X, y)


def evaluate(truth, prediction, baseline_prediction, *, classes: Sequence | None = None, n_train: int,
             baseline_n_train: int, run=None, names: tuple[str, str] = ("fine-tuned model", "baseline"),
             extra: Mapping | None = None) -> Evaluation:
    """Score the model's and the baseline's test predictions with the same function; write ``final_metrics.json``.

    For a classification give ``classes`` and, as predictions, class probabilities (samples x classes) or labels;
    for a regression give numbers (samples, or samples x targets) and no ``classes``. ``n_train`` and
    ``baseline_n_train`` are the number of samples each was fit on (the protocol wants them equal; a workflow whose
    baseline may not be fit on the model's rows says why in its docs). ``extra`` joins ``final`` as it is.
    """
    from .metrics import Evaluation, MetricsTable, classification_metrics, confusion_matrix, regression_metrics

    def score(pred):
        if classes is None:
            return regression_metrics(np.asarray(truth), np.asarray(pred))
        pred = np.asarray(pred)
        if pred.ndim == 2:
            return classification_metrics(truth, np.asarray(classes)[pred.argmax(1)], y_score=pred, labels=classes)
        return classification_metrics(truth, pred, labels=classes)

    ours, theirs = score(prediction), score(baseline_prediction)
    final = ({f"test_{k}": v for k, v in ours.items()} | {f"baseline_test_{k}": v for k, v in theirs.items()}
             | {"n_train": int(n_train), "baseline_n_train": int(baseline_n_train)} | dict(extra or {}))
    if run is not None:
        final = run.finish(final)
    confusion = None
    if classes is not None:
        pred = np.asarray(prediction)
        labels = np.asarray(classes)[pred.argmax(1)] if pred.ndim == 2 else pred
        confusion = confusion_matrix(truth, labels, labels=classes)
    return Evaluation(MetricsTable({names[0]: ours, names[1]: theirs}), confusion, final)
