"""Issue 22's acceptance: a sixth workflow, written as a lab's own package, gets everything the built-in five get.

The test writes a package (``sixth_lab``: generated data, an MLP with denoising pretraining, a logistic-regression
baseline) and its notebook into a temporary folder, and installs it as a distribution there: the folder holds the
package and ``sixth_lab-0.1.dist-info/`` with ``METADATA`` and ``entry_points.txt`` (the two files through which
``importlib.metadata`` finds an entry point; ``pip install --target`` of the same package with a pyproject.toml
writes the same entry_points.txt, but costs 20-25 s here). The folder goes on PYTHONPATH for the subprocesses (the
``workbench`` command and its kernels: ``workbench run`` and ``workbench sweep``) and on sys.path for what runs in this
process (``workbench run sixth --help``, ``workbench report``, the panel). Nothing in workbench/ knows the package: it
is found through the entry-point group ``workbench.workflows`` alone.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

WORKFLOW_PY = '''\
"""A sixth workflow, shipped as a lab's own package: two classes of points whose label hangs on an interaction.

Data: ``simulate`` draws 8 standard-normal features; the label is ``x0 * x1 + 0.5 * x2 > 0`` (the ground truth), so a
linear model sees only the x2 part. Model: an MLP encoder and a linear head. Pretraining: denoising (reconstruct the
features from a noisy copy) on the non-test points, cached by the core. Baseline: logistic regression on the raw
features of exactly the model's training points.
"""

from pathlib import Path

from workbench.params import Choice, Integer, Real
from workbench.workflow import Param, Workflow

from .steps import Classifier, Data, Denoiser, evaluate, finetune, pretrained, simulate

__all__ = ["WORKFLOW", "Classifier", "Data", "Denoiser", "evaluate", "finetune", "pretrained", "simulate"]

WORKFLOW = Workflow(
    name="sixth",
    title="Interaction points (a lab's own workflow)",
    notebook=Path(__file__).parent / "sixth.ipynb",
    headline_metrics=("test_macro_f1", "test_accuracy", "baseline_test_macro_f1"),
    parameters=dict(
        n_samples=Param(400, "points simulated", Integer(ge=40)),
        hidden=Param(16, "width of the encoder", Integer(ge=1)),
        pretrained_checkpoint=Param("pretrain"),
        pretrain_epochs=Param(5),
        label_fraction=Param(1.0),
        val_fraction=Param(0.2, accepts=Real(gt=0, lt=0.5)),
        test_size=Param(0.25),
        epochs=Param(20),
        learning_rate=Param(3.0e-3),
        lr_scheduler_type=Param("cosine", "constant | cosine | linear", Choice("constant", "cosine", "linear")),
        batch_size=Param(32),
    ),
)
'''

STEPS_PY = '''\
"""The sixth workflow's data, model, pretraining objective and steps; the protocol (split, cached pretraining, fit
with the best epoch restored, baseline on the same points, one evaluation for both) is the core's."""

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import workbench as wb
from workbench import protocol, splits
from workbench.batches import TensorBatches
from workbench.metrics import validation_accuracy_and_macro_f1

CLASSES = (0, 1)


@dataclass
class Data:
    """Features, labels and the split: train (fit), val (picks the best epoch), test (scored once)."""

    X: np.ndarray
    y: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def batches(self, rows, *, batch_size, shuffle, seed=0):
        tensors = (torch.as_tensor(self.X[rows]), torch.as_tensor(self.y[rows]))
        return TensorBatches(tensors, batch_size=batch_size, shuffle=shuffle, seed=seed)

    def _repr_html_(self):
        return (f"<p>{len(self.y)} points, {self.X.shape[1]} features: train {len(self.train)}, "
                f"val {len(self.val)}, test {len(self.test)}</p>")


def simulate(*, n_samples=400, label_fraction=1.0, val_fraction=0.2, test_size=0.25, seed=0):
    """Points with 8 standard-normal features, labelled ``x0 * x1 + 0.5 * x2 > 0``, split by the core."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_samples, 8)).astype(np.float32)
    y = (X[:, 0] * X[:, 1] + 0.5 * X[:, 2] > 0).astype(np.int64)
    train, test = splits.holdout(y, test_size=test_size, seed=seed)
    fit_rows, val_rows = splits.holdout(y[train], test_size=val_fraction, seed=seed)
    train, val = train[fit_rows], train[val_rows]
    train = train[splits.few_shot(y[train], fraction=label_fraction, seed=seed)]
    return Data(X, y, train, val, test)


class Classifier(nn.Module):
    """An MLP encoder and a linear head; ``loss`` is what ``wb.fit`` minimises."""

    def __init__(self, hidden=16):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, len(CLASSES))

    def forward(self, x):
        return self.head(self.encoder(x))

    def loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)


class Denoiser(nn.Module):
    """The pretraining objective: reconstruct the features from a noisy copy, through the classifier's encoder."""

    def __init__(self, hidden=16):
        super().__init__()
        self.encoder = Classifier(hidden).encoder
        self.decoder = nn.Linear(hidden, 8)

    def loss(self, batch):
        (x,) = batch
        return F.mse_loss(self.decoder(self.encoder(x + 0.3 * torch.randn_like(x))), x)


def pretrained(data, pretrained_checkpoint, *, hidden=16, pretrain_epochs=5, seed=0, device="auto", dtype=None):
    """The checkpoint fine-tuning starts from: the core's cached pretraining on the non-test points, or none/a path."""
    rows = np.setdiff1d(np.arange(len(data.y)), data.test)
    return protocol.pretrained(
        pretrained_checkpoint, workflow="sixth", objective="denoising", reads=(data.X, rows),
        settings={"hidden": hidden}, model=lambda: Denoiser(hidden),
        batches=lambda: TensorBatches((torch.as_tensor(data.X[rows]),), batch_size=64, shuffle=True, seed=seed),
        epochs=pretrain_epochs, learning_rate=3e-3, seed=seed, code=__name__, device=device, dtype=dtype)


def finetune(model, data, *, epochs, learning_rate, batch_size, lr_scheduler_type="cosine", seed=0, run=None,
             device="auto", dtype=None):
    """``wb.fit`` on the training points; the best epoch by validation macro-F1 is restored."""
    return wb.fit(model, data.batches(data.train, batch_size=batch_size, shuffle=True, seed=seed),
                  val_data=data.batches(data.val, batch_size=256, shuffle=False),
                  evaluate=validation_accuracy_and_macro_f1, monitor="val_macro_f1", mode="max", epochs=epochs,
                  learning_rate=learning_rate, lr_scheduler_type=lr_scheduler_type, warmup_ratio=0.1,
                  restore_best=True, seed=seed, run=run, device=device, dtype=dtype, progress=False)


def evaluate(model, data, *, seed=0, run=None):
    """Model and baseline (fit on exactly the model's training points) scored by the core; final_metrics.json."""
    baseline = protocol.fit_baseline(data.X[data.train], data.y[data.train], kind="logistic", seed=seed)
    model.eval()
    with torch.no_grad():
        probabilities = torch.softmax(model(wb.to_model(torch.as_tensor(data.X[data.test]), model)), 1)
    return protocol.evaluate(data.y[data.test], wb.to_numpy(probabilities), baseline.predict_proba(data.X[data.test]),
                             classes=CLASSES, n_train=len(data.train), baseline_n_train=len(data.train), run=run)
'''

CELLS = [
    ("markdown", "# Interaction points: a lab's own workflow\n\nHeadless: `workbench run sixth -p epochs 5`"),
    ("code", "import workbench as wb\nimport sixth_lab as lab\n\n"
             "params, run = lab.WORKFLOW.start(globals())  # check values, seed, open the run folder"),
    ("code", "data = lab.simulate(n_samples=n_samples, label_fraction=label_fraction, val_fraction=val_fraction,\n"
             "                    test_size=test_size, seed=seed)\ndata"),
    ("code", "model = lab.Classifier(hidden)\n"
             "source = lab.pretrained(data, pretrained_checkpoint, hidden=hidden, pretrain_epochs=pretrain_epochs,\n"
             "                        seed=seed, device=device, dtype=dtype)\n"
             "report = wb.load_pretrained(model, source, run=run) if source else 'training from scratch'\nreport"),
    ("code", "if interactive:\n    from IPython.display import display\n    from workbench import widgets\n\n"
             "    display(widgets.panel(fallback=lab.WORKFLOW.notebook, train_size=len(data.train),\n"
             "                          values={**params, 'output_dir': str(run.path)}))"),
    ("code", "history = lab.finetune(model, data, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,\n"
             "                       lr_scheduler_type=lr_scheduler_type, seed=seed, run=run, device=device,\n"
             "                       dtype=dtype)\n"
             "print(history.summary())"),
    ("code", "result = lab.evaluate(model, data, seed=seed, run=run)\nresult"),
]

TINY = ["-p", "n_samples", "160", "-p", "epochs", "2", "-p", "pretrain_epochs", "1"]


def write_package(site: Path) -> int:
    """Write the package, its notebook and its dist-info under ``site``; return the package's lines of Python."""
    import nbformat

    package = site / "sixth_lab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(WORKFLOW_PY)
    (package / "steps.py").write_text(STEPS_PY)
    info = site / "sixth_lab-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sixth-lab\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[workbench.workflows]\nsixth = sixth_lab:WORKFLOW\n")

    sys.path.insert(0, str(site))  # the parameters cell is the declaration's, as for the built-in notebooks
    try:
        from sixth_lab import WORKFLOW
    finally:
        sys.path.remove(str(site))
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    cells = [make[kind](source) for kind, source in CELLS]
    cells.insert(1, nbformat.v4.new_code_cell(WORKFLOW.parameters_cell(), metadata={"tags": ["parameters"]}))
    metadata = {"kernelspec": {"name": "workbench", "display_name": "Python (workbench)", "language": "python"},
                "workbench": {"workflow": "sixth"}}
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata=metadata), package / "sixth.ipynb")
    return sum(len(path.read_text().splitlines()) for path in package.rglob("*.py"))


@pytest.fixture(scope="module")
def sixth(tmp_path_factory):
    """The installed package: its site folder, its notebook, and an environment whose PYTHONPATH holds it."""
    root = tmp_path_factory.mktemp("sixth")
    lines = write_package(root / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(root / "site"))
                                                       if p)}
    yield {"root": root, "site": root / "site", "notebook": root / "site" / "sixth_lab" / "sixth.ipynb",
           "env": env, "lines": lines}
    sys.modules.pop("sixth_lab", None)
    sys.modules.pop("sixth_lab.steps", None)


@pytest.fixture
def on_path(sixth, monkeypatch):
    """The package's site folder on sys.path of this process, as if installed here; the registry forgets it after."""
    from workbench import workflow

    monkeypatch.syspath_prepend(str(sixth["site"]))
    yield sixth
    workflow._entry_points.cache_clear()


def workbench(*args, env, cwd) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "workbench.cli", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"workbench {' '.join(map(str, args))}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done


def test_the_sixth_package_is_at_most_150_lines_of_python(sixth):
    assert 0 < sixth["lines"] <= 150


def test_workbench_run_gives_model_and_baseline_metrics_on_the_same_samples(sixth):
    out = sixth["root"] / "run"
    done = workbench("run", sixth["notebook"], *TINY, "-o", out, env=sixth["env"], cwd=sixth["root"])
    assert f"run folder: {out}" in done.stdout
    final = json.loads((out / "final_metrics.json").read_text())
    for name in ("test_macro_f1", "test_accuracy", "baseline_test_macro_f1", "baseline_test_accuracy"):
        assert 0 <= final[name] <= 1, name
    assert final["n_train"] == final["baseline_n_train"] == 96  # 160 points: 40 test, 24 validate
    params = json.loads((out / "params.json").read_text())
    assert params["epochs"] == 2 and params["n_samples"] == 160 and params["interactive"] is False
    assert (out / "notebook.ipynb").is_file() and (out / "checkpoints" / "best.safetensors").is_file()


def test_workbench_lists_the_sixth_workflow_and_its_parameters_by_name(on_path, capsys):
    from workbench.cli import main

    assert main(["workflows"]) == 0
    listed = capsys.readouterr().out
    assert re.search(rf"^sixth +Interaction points \(a lab's own workflow\)\n +{re.escape(str(on_path['notebook']))}$",
                     listed, re.MULTILINE)
    assert main(["run", "sixth", "--help"]) == 0  # found by its name
    help_ = capsys.readouterr().out
    assert "parameters of the sixth workflow (sixth.ipynb)" in help_
    assert re.search(r'lr_scheduler_type +str += "cosine" +constant \| cosine \| linear \[one of constant, cosine, '
                     r'linear\]', help_)


def test_a_two_run_sweep_finishes_and_the_report_names_the_headline_metric(sixth, on_path, capsys):
    from workbench.cli import main

    spec = sixth["root"] / "seeds.yaml"
    spec.write_text(f"name: sixth_seeds\nnotebook: {sixth['notebook']}\noutput_root: {sixth['root'] / 'sweeps'}\n"
                    "parameters: {n_samples: 160, epochs: 2, pretrain_epochs: 1}\nseeds: [0, 1]\n")
    done = workbench("sweep", spec, env=sixth["env"], cwd=sixth["root"])
    assert "sweep sixth_seeds: 2 runs, 0 failed, 2 executed now" in done.stdout
    folder = sixth["root"] / "sweeps" / "sixth_seeds"
    assert main(["report", str(folder), "--html"]) == 0
    out = capsys.readouterr().out
    assert "test_macro_f1_mean" in out.splitlines()[1]  # the workflow's first headline metric heads the summary
    assert re.search(r"^figure: .*figure\.png \(test_macro_f1 ", out, re.MULTILINE)
    html = (folder / "report.html").read_text()
    assert "test_macro_f1" in html and "baseline_test_macro_f1" in html


def test_the_panel_and_the_sweep_checks_come_from_the_declaration(on_path):
    import ipywidgets as w

    from workbench import sweeps, widgets, workflow
    from workbench.params import ParameterError

    sixth = on_path
    declared = workflow.get_workflow("sixth")
    assert "sixth" in workflow.workflows() and workflow.workflow_of(sixth["notebook"]) is declared
    panel = widgets.panel(sixth["notebook"], train=lambda values, callbacks=(): None, train_size=100)
    assert panel.workflow is declared and list(panel.fields) == list(declared.parameters)
    assert list(panel.fields["lr_scheduler_type"].options) == ["constant", "cosine", "linear"]
    assert isinstance(panel.fields["lr_scheduler_type"], w.Dropdown)
    assert isinstance(panel.fields["pretrained_checkpoint"], w.Combobox)  # pretrain | none | a path
    assert list(panel.fields["pretrained_checkpoint"].options) == ["pretrain", "none"]
    assert type(panel.fields["n_samples"]) is w.IntText and type(panel.fields["val_fraction"]) is w.FloatText
    assert panel.metric_field.value == "test_macro_f1" and panel.preview_curve is not None
    with pytest.raises(ValueError, match="the options the sixth workflow declares"):
        panel.set(lr_scheduler_type="step")

    bad = {"name": "bad", "notebook": str(sixth["notebook"]), "output_root": str(sixth["root"] / "bad"),
           "grid": {"val_fraction": [0.2, 0.6]}, "seeds": [0, 1]}
    with pytest.raises(ParameterError, match=r"\(sixth workflow\) \(2 of 4 runs .*no run was started") as err:
        sweeps.load_spec(bad)
    assert "val_fraction=0.6 is not a number > 0 and < 0.5" in str(err.value)
    assert not (sixth["root"] / "bad").exists()
