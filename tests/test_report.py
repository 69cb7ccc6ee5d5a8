"""workbench.report and `workbench report --x --hue --metric --html`.

The figure choice and the gap are checked on made-up result tables (no notebook runs); the HTML
report on a real sweep of tests/notebooks/tiny.ipynb with one failed run (papermill, nbconvert).
"""

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import matplotlib
import pandas as pd
import pytest
import yaml

matplotlib.use("Agg")

import workbench as wb
from workbench.cli import main
from workbench.report import choose_figure, load_result, plot, transfer_gap, write_html
from workbench.sweeps import SweepResult, summarize

from .test_execute import TINY, expected_accuracy

REPO = Path(__file__).resolve().parents[1]
FRACTIONS = [0.05, 0.1, 0.25, 0.5, 1.0]


def made_up_sweep(grid: dict, metric, *, seeds=(0, 1, 2), name="made_up") -> SweepResult:
    """A SweepResult over the product of ``grid`` and ``seeds``; ``metric(params)`` gives test_score."""
    import itertools

    rows = []
    for values in itertools.product(*grid.values()):
        for seed in seeds:
            params = {**dict(zip(grid, values)), "seed": seed}
            rows.append({"run_id": f"r{len(rows)}", "status": "ok", "error": None, "failed_cell": None,
                         "seconds": 1.0, **params, "test_score": metric(params), "test_other": 0.5})
    results = pd.DataFrame(rows)
    summary = summarize(results, by=list(grid), metrics=["test_score", "test_other"])
    return SweepResult(name=name, path=Path("."), results=results, summary=summary, n_failed=0, n_executed=0,
                       metric="test_score")


def transfer(params) -> float:
    """Pretraining helps more with fewer labels; the seed moves both settings alike (so pairing matters)."""
    base = 0.5 + 0.3 * params["label_fraction"] + 0.05 * params["seed"]
    return base + (0.1 * (1 - params["label_fraction"]) if params["pretrained_checkpoint"] == "pretrain" else 0.0)


TRANSFER_GRID = {"pretrained_checkpoint": ["pretrain", "none"], "label_fraction": FRACTIONS}


# --------------------------------------------------------------------------------------------
# which figure
# --------------------------------------------------------------------------------------------


def test_a_numeric_grid_parameter_goes_on_the_x_axis_with_a_log_scale_past_a_decade():
    result = made_up_sweep(TRANSFER_GRID, transfer)
    choice = choose_figure(result)
    assert (choice.kind, choice.x, choice.hue, choice.metric) == ("curve", "label_fraction",
                                                                   "pretrained_checkpoint", "test_score")
    assert choice.log_x, "0.05 .. 1.0 spans more than a decade"
    narrow = made_up_sweep({"pretrained_checkpoint": ["pretrain", "none"], "label_fraction": [0.1, 1.0]}, transfer)
    assert not choose_figure(narrow).log_x, "0.1 .. 1.0 is one decade, not more"


def test_without_a_numeric_parameter_the_figure_is_grouped_points():
    result = made_up_sweep({"strategy": ["full", "frozen"], "schedule": ["constant", "cosine"]},
                           lambda p: 0.7 + (p["strategy"] == "full") * 0.1)
    choice = choose_figure(result)
    assert (choice.kind, choice.x, choice.hue) == ("points", "strategy", "schedule")
    figure = plot(result)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["full", "frozen"]
    assert len(ax.containers) == 2, "one errorbar series per schedule"


def test_x_hue_and_metric_override_the_choice_and_bad_names_list_the_options():
    result = made_up_sweep(TRANSFER_GRID, transfer)
    choice = choose_figure(result, x="pretrained_checkpoint", hue="label_fraction", metric="test_other")
    assert (choice.kind, choice.x, choice.hue, choice.metric) == ("points", "pretrained_checkpoint",
                                                                   "label_fraction", "test_other")
    with pytest.raises(ValueError, match=r"x='label_fractoin'.*label_fraction.*did you mean 'label_fraction'"):
        choose_figure(result, x="label_fractoin")
    with pytest.raises(ValueError, match=r"metric='test_scor'.*test_score, test_other"):
        choose_figure(result, metric="test_scor")
    with pytest.raises(ValueError, match="x and hue are both"):
        choose_figure(result, x="label_fraction", hue="label_fraction")


def test_the_transfer_curve_shows_both_settings_and_the_gap_paired_by_seed():
    result = made_up_sweep(TRANSFER_GRID, transfer)
    gap = transfer_gap(result)
    assert gap["label_fraction"].tolist() == FRACTIONS
    assert gap["gap_mean"].tolist() == pytest.approx([0.1 * (1 - f) for f in FRACTIONS])
    # the seed moves both settings by 0.05 per seed: unpaired, the spread would be about 0.07
    assert gap["gap_std"].max() < 1e-9 and (gap["n_pairs"] == 3).all()
    assert (gap.attrs["a"], gap.attrs["b"]) == ("pretrain", "none")

    figure = wb.sweeps.plot(result)
    assert wb.sweeps.plot is plot
    curves, gap_axis = figure.axes
    assert curves.get_xscale() == "log"
    assert [t.get_text() for t in curves.get_legend().get_texts()] == [
        "pretrained_checkpoint=pretrain", "pretrained_checkpoint=none"]
    assert len(curves.collections) == 2, "one mean ± std band per curve"
    drawn = gap_axis.lines[-1].get_ydata()
    assert list(drawn) == pytest.approx([0.1 * (1 - f) for f in FRACTIONS])


def test_with_a_failed_run_every_column_of_the_gap_and_the_curve_use_the_same_pairs():
    """Issue 21 item 20: with one failed run, pretrain_mean - none_mean was -0.067 on the row where gap_mean (paired
    by seed) was +0.05, and the curve drew the unpaired means."""
    result = made_up_sweep(TRANSFER_GRID, transfer)
    frame = result.results
    lost = (frame["pretrained_checkpoint"] == "pretrain") & (frame["label_fraction"] == 0.05) & (frame["seed"] == 2)
    frame.loc[lost, "status"] = "failed"  # seed 2 is the best seed (+0.10): without it pretrain looks worse
    frame.loc[lost, "test_score"] = float("nan")
    gap = transfer_gap(result).set_index("label_fraction")
    row = gap.loc[0.05]
    assert row["pretrain_mean"] - row["none_mean"] == pytest.approx(row["gap_mean"])
    assert row["gap_mean"] == pytest.approx(0.1 * 0.95) and row["n_pairs"] == 2 and row["n_unpaired"] == 1
    assert row["none_mean"] == pytest.approx(transfer({"label_fraction": 0.05, "seed": 0.5,
                                                       "pretrained_checkpoint": "none"}))  # seeds 0 and 1
    assert gap.attrs["unpaired"] == 1 and (gap.drop(index=0.05)["n_unpaired"] == 0).all()
    figure = plot(result)
    curves = figure.axes[0]
    none_curve = curves.lines[1]
    assert none_curve.get_ydata()[0] == pytest.approx(row["none_mean"])  # the curve's point: the paired mean
    assert curves.lines[0].get_ydata()[0] - none_curve.get_ydata()[0] == pytest.approx(row["gap_mean"])
    assert "1 run(s) whose seed did not finish" in curves.get_title()


def test_runs_without_the_x_parameter_are_drawn_as_reference_levels():
    """As regulatory_lora.yaml: LoRA ranks on the x axis, full fine-tuning has no rank."""
    rows = []
    for seed in (0, 1):
        for rank in (2, 4, 8):
            rows.append({"finetune": "lora", "lora_rank": rank, "pretrained_checkpoint": None, "seed": seed,
                         "test_pearson": 0.5 + 0.01 * rank})
        for checkpoint in ("pretrain", "none"):
            rows.append({"finetune": "full", "lora_rank": None, "pretrained_checkpoint": checkpoint, "seed": seed,
                         "test_pearson": 0.6 if checkpoint == "pretrain" else 0.4})
    results = pd.DataFrame(rows).assign(run_id=lambda f: [f"r{i}" for i in range(len(f))], status="ok")
    keys = ["finetune", "lora_rank", "pretrained_checkpoint"]
    result = SweepResult(name="lora", path=Path("."), results=results,
                         summary=summarize(results, by=keys, metrics=["test_pearson"]), n_failed=0, n_executed=0)
    choice = choose_figure(result)
    assert (choice.kind, choice.x, choice.hue) == ("curve", "lora_rank", "finetune")
    labels = [t.get_text() for t in plot(result).axes[0].get_legend().get_texts()]
    assert "finetune=lora" in labels
    assert "finetune=full, pretrained_checkpoint=pretrain (no lora_rank)" in labels


# --------------------------------------------------------------------------------------------
# the HTML report of a real sweep with one failed run
# --------------------------------------------------------------------------------------------

TINY_GRID = [
    {"lr": [1.0e-4, 1.0e-2], "lr_scheduler_type": ["constant", "cosine"], "seed": [0, 1]},
    {"lr": [1.0e-3], "lr_scheduler_type": ["cosin"], "seed": [0]},  # a typo: this run fails in its check cell
]
ERROR_LINE = "lr_scheduler_type='cosin' is not one of constant, cosine"


def run_small_sweep(folder: Path) -> Path:
    """`workbench sweep` of tiny.ipynb: 2 lr x 2 schedules x 2 seeds, plus one run that fails; the sweep folder."""
    spec = {"name": "tiny_report", "notebook": str(TINY), "grid": TINY_GRID, "metric": "accuracy",
            "parameters": {"epochs": 2}, "output_root": str(folder / "sweeps")}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sweep", str(path), "--workers", "2"]) == 1, "the failed run makes the sweep exit 1"
    return folder / "sweeps" / "tiny_report"


class Page(HTMLParser):
    """What the test reads from a page: links, images, scripts, run rows and their text."""

    def __init__(self, text: str):
        super().__init__()
        self.links, self.images, self.scripts, self.rows = [], [], [], {}
        self._row = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("script", "link") and (attrs.get("src") or attrs.get("href")):
            self.scripts.append(attrs.get("src") or attrs.get("href"))
        if tag == "tr" and (attrs.get("id") or "").startswith("run-"):
            self._row = attrs["id"][len("run-"):]
            self.rows[self._row] = {"class": attrs.get("class", ""), "text": ""}

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row is not None:
            self.rows[self._row]["text"] += data


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory) -> Path:
    return run_small_sweep(tmp_path_factory.mktemp("report"))


@pytest.mark.slow
def test_the_html_report_holds_every_run_the_error_line_and_working_links(small_sweep, capsys):
    assert json.loads((small_sweep / "spec.json").read_text())["metric"] == "accuracy"
    assert main(["report", str(small_sweep), "--html"]) == 0
    printed = capsys.readouterr().out
    assert "figure:" in printed and "accuracy against lr" in printed and "report.html" in printed
    report = small_sweep / "report.html"
    page = Page(report.read_text())

    results = pd.read_csv(small_sweep / "results.csv")
    assert len(results) == 9
    assert set(page.rows) == set(results["run_id"]), "one row per run"
    failed = results.loc[results["status"] == "failed", "run_id"].tolist()
    assert len(failed) == 1 and "failed" in page.rows[failed[0]]["class"]
    assert ERROR_LINE in page.rows[failed[0]]["text"]
    ok_row = page.rows[results.loc[results["status"] == "ok", "run_id"].iloc[0]]
    assert "ok" in ok_row["class"] and "epochs=2" in ok_row["text"], "parameters that differ from the defaults"
    assert "output_dir" not in ok_row["text"]

    # one file: the figure is embedded, nothing is fetched, every link is relative and leads to a file
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert not page.scripts
    notebook_links = [link for link in page.links if link.endswith("notebook.html")]
    assert len(notebook_links) == 9, "the failed run's executed notebook (with its traceback) is linked too"
    for link in page.links:
        assert not link.startswith(("/", "http:", "https:", "file:")), link
        assert (report.parent / unquote(link)).exists(), f"broken link {link}"
    failed_page = (report.parent / unquote(next(link for link in notebook_links if failed[0] in unquote(link))))
    rendered = failed_page.read_text()
    assert "ValueError" in rendered and "cosin" in rendered
    assert not Page(rendered).scripts, "the rendered notebook fetches nothing either"
    text = report.read_text()
    for needed in ('id="summary"', 'id="spec"', "nbconvert", 'id="date"', "± ", "Gap in accuracy"):
        assert needed in text, needed


@pytest.mark.slow
def test_the_figure_of_the_real_sweep_is_a_log_curve_with_the_gap_between_schedules(small_sweep):
    result = load_result(small_sweep)
    choice = choose_figure(result)
    assert (choice.kind, choice.x, choice.hue, choice.log_x) == ("curve", "lr", "lr_scheduler_type", True)
    gap = transfer_gap(result)
    assert (gap.attrs["a"], gap.attrs["b"]) == ("constant", "cosine"), "levels of the runs that finished, grid order"
    constant = expected_accuracy(lr=1.0e-4, epochs=2, seed=1)
    cosine = expected_accuracy(lr=1.0e-4, epochs=2, seed=1, lr_scheduler_type="cosine")
    assert gap["gap_mean"].tolist() == pytest.approx([constant - cosine] * 2, abs=1e-6)
    assert (small_sweep / "comparison.png").stat().st_size > 1000, "the sweep itself draws the chosen figure"
    # --x/--hue/--metric reach the figure, and a wrong name is an error with the options
    assert main(["report", str(small_sweep), "--x", "lr_scheduler_type", "--metric", "loss"]) == 0
    assert main(["report", str(small_sweep), "--hue", "seed"]) == 2


def test_report_of_a_folder_without_spec_json_reconstructs_the_spec(tmp_path):
    """Sweeps made before spec.json existed: the grid comes from summary.csv, the spec shown from results.csv."""
    result = made_up_sweep(TRANSFER_GRID, transfer, name="old")
    result.path = tmp_path
    result.results.to_csv(tmp_path / "results.csv", index=False)
    result.summary.to_csv(tmp_path / "summary.csv", index=False)
    loaded = load_result(tmp_path)
    assert choose_figure(loaded).x == "label_fraction"
    page = write_html(tmp_path).read_text()
    assert "reconstructed from results.csv" in page and "(none)" in page, "runs without a notebook get no link"
