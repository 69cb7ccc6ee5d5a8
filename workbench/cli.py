"""The ``workbench`` command: run a notebook, run a sweep, report on results.

::

    workbench run notebooks/cell_type_annotation.ipynb -p learning_rate 1e-3 -p epochs 2
    workbench run notebooks/cell_type_annotation.ipynb --nproc 2 -o runs/ct_ddp      # DDP, 2 processes
    workbench run cell_type -p epochs 2                       # a registered workflow, by name
    workbench run notebooks/cell_type_annotation.ipynb --help # its parameters, from the workflow's declaration
    workbench workflows                                       # the registered workflows
    workbench sweep notebooks/sweeps/lr_schedule.yaml --workers 2
    workbench report runs/sweeps/lr_schedule
    workbench predict runs/ct_constant new_cells.h5ad -o predictions.csv -o annotated.h5ad

Parameter values given with ``-p NAME VALUE`` are converted to the type that the notebook's
parameters cell declares (``-p epochs 3`` gives the int 3, ``-p lr 1e-3`` the float 0.001).
Imports of papermill, pandas and dask happen inside the commands, so ``workbench --help`` is quick.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``workbench`` console script.

    Parameters
    ----------
    argv
        Arguments without the program name; None reads ``sys.argv``.

    Returns
    -------
    int
        Exit status: 0 on success, 1 when a run failed, 2 for invalid arguments or inputs.
    """
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"workbench {args.name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"workbench {args.name}: interrupted; completed runs are kept, run the same command again to finish.",
              file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="Run parameterized notebooks and sweeps.")
    commands = parser.add_subparsers(title="commands", required=True,
                                     metavar="{run,sweep,report,predict,workflows}")

    run = commands.add_parser("run", help="execute one notebook with parameters into a run folder", add_help=False,
                              description="Execute one notebook with parameters into a run folder. "
                                          "`workbench run NOTEBOOK --help` also lists the notebook's parameters.")
    run.add_argument("notebook", type=Path, nargs="?", default=None,
                     help="the .ipynb file (needs a cell tagged 'parameters'), or the name of a registered workflow "
                          "(`workbench workflows` lists them)")
    run.add_argument("-h", "--help", action="store_true",
                     help="show this help and the parameters of NOTEBOOK (its workflow's declaration), then exit")
    run.add_argument("--list", action="store_true", help="list the registered workflows and exit")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="set a parameter; repeat for several (VALUE is converted to the declared type)")
    run.add_argument("-o", "--output-dir", type=Path, default=None,
                     help="run folder (default: a new runs/<notebook name>/<timestamp>-<id>)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a run with other parameters that the run folder already holds (default: refuse)")
    run.add_argument("-k", "--kernel", default="workbench", help="Jupyter kernel name (default: workbench)")
    run.add_argument("--timeout", type=float, default=None, help="seconds one cell may run (default: no limit)")
    run.add_argument("--log-output", action="store_true", help="echo the notebook's output while it runs")
    run.add_argument("--nproc", type=int, default=1,
                     help="train on N processes with torchrun (DDP; rank 0 writes the run folder, no executed "
                          "notebook). Several machines: see `python -m workbench.launch --help` (default: 1)")
    run.add_argument("--backend", choices=("auto", "nccl", "gloo"), default="auto",
                     help="process group backend with --nproc: auto is nccl (one GPU per process) when CUDA is "
                          "available, else gloo; gloo runs CPU processes on a GPU machine too (default: auto)")
    run.set_defaults(command=_cmd_run, name="run", parser=run)

    sweep = commands.add_parser("sweep", help="run a grid sweep from a YAML spec (resumable)")
    sweep.add_argument("spec", type=Path, help="sweep spec (.yaml)")
    sweep.add_argument("--workers", type=int, default=1, help="runs at the same time (default: 1)")
    sweep.add_argument("--executor", choices=("local", "dask"), default="local",
                       help="local process pool or a Dask cluster (default: local)")
    sweep.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (with --executor dask)")
    sweep.add_argument("-k", "--kernel", default="workbench", help="Jupyter kernel name (default: workbench)")
    sweep.add_argument("--timeout", type=float, default=None, help="seconds one cell may run (default: no limit)")
    sweep.add_argument("--rerun-stale", action="store_true",
                       help="also run again the finished runs that an earlier version of the notebook made "
                            "(default: keep them and say how many)")
    sweep.set_defaults(command=_cmd_sweep, name="sweep")

    report = commands.add_parser(
        "report", help="print the results of a sweep folder or a run folder; draw the sweep's figure",
        description="For a sweep folder: print the summary, draw the figure the grid calls for into DIR/figure.png "
                    "(the metric against a numeric grid parameter, one line per value of the others, mean ± std "
                    "over seeds, and the gap when the colour parameter has two values; grouped points otherwise) "
                    "and, with --html, write DIR/report.html. For a run folder: print its status, parameters "
                    "and metrics.")
    report.add_argument("folder", type=Path, help="a sweep folder (summary.csv) or a run folder (final_metrics.json)")
    report.add_argument("--metric", default=None, help="final metric of the figure (default: the spec's metric)")
    report.add_argument("--x", default=None,
                        help="grid parameter on the x axis (default: the numeric grid parameter with most values)")
    report.add_argument("--hue", default=None, help="grid parameter for the colour (default: the first other one)")
    report.add_argument("--html", action="store_true",
                        help="also write DIR/report.html: one file with the figure, the summary, a row per run "
                             "with a link to its executed notebook (rendered by nbconvert), versions and date")
    report.set_defaults(command=_cmd_report, name="report")

    predict = commands.add_parser(
        "predict", help="predict on new data with a finished run folder",
        description="Load the model and preprocessing state a run folder keeps (predictor.json) and predict on "
                    "DATA: an .h5ad for cell-type and spatial runs, a folder of recordings for heart-sound runs, "
                    "an event table (.csv/.parquet) for event-sequence runs, a condition table for regulatory runs. "
                    "Prints how the input was aligned to the model (genes/fields matched, missing, extra).")
    predict.add_argument("run_dir", type=Path, help="the run folder (its output_dir)")
    predict.add_argument("data", type=Path, help="the data to predict on")
    predict.add_argument("-o", "--output", type=Path, action="append", required=True, metavar="OUT",
                         help="where to write: .csv or .parquet (the table), .h5ad (a copy of AnnData input with "
                              ".obs/.obsm filled); repeat for several")
    predict.add_argument("--what", default=None,
                         help="probabilities (default for classifiers) | embedding | values (regressors)")
    predict.add_argument("--batch-size", type=int, default=None, help="samples per forward pass")
    predict.add_argument("--max-missing", type=float, default=None,
                         help="share of the model's features that may be missing from DATA (filled with 0; "
                              "default 0.5)")
    predict.add_argument("--fold", default=None,
                         help="spatial runs: predict with this fold's model (default: the mean of the folds' models)")
    predict.set_defaults(command=_cmd_predict, name="predict")

    listing = commands.add_parser(
        "workflows", help="list the registered workflows (name, title, notebook)",
        description="The workflows registered under the entry-point group workbench.workflows: workbench's own and "
                    "those of other installed packages. Run one with `workbench run NAME` or its notebook.")
    listing.set_defaults(command=_cmd_workflows, name="workflows")
    return parser


def _cmd_workflows(args) -> int:
    from .workflow import workflows

    found = workflows()
    if not found:
        print("no workflow is registered (entry-point group workbench.workflows); is workbench installed "
              "(pip install -e .)?")
        return 0
    width = max(map(len, found))
    for name, workflow in found.items():
        print(f"{name:<{width}}  {workflow.title or '(no title)'}\n{'':<{width}}  {workflow.notebook}")
    return 0


def _resolve_notebook(given: Path) -> tuple[Path, object]:
    """``(notebook, its workflow or None)`` for what ``workbench run`` was given: a notebook path, or the name of a
    registered workflow (when no file of that name exists)."""
    from .workflow import get_workflow, workflow_of

    if given.suffix != ".ipynb" and not given.exists() and given.name == str(given):
        try:
            workflow = get_workflow(str(given))
        except KeyError as err:
            raise FileNotFoundError(f"{str(given)!r} is neither a notebook nor a registered workflow: "
                                    f"{err.args[0]}") from None
        return workflow.notebook, workflow
    if not given.is_file():
        raise FileNotFoundError(f"notebook={str(given)!r} does not exist (looked in {Path.cwd()}).")
    return given, workflow_of(given)


def _notebook_help(notebook: Path, workflow) -> str:
    """The parameters ``workbench run NOTEBOOK --help`` lists: the workflow's declaration, else the cell's lines."""
    if workflow is not None:
        return workflow.help()
    from .execute import notebook_parameters

    declared = notebook_parameters(notebook)
    if not declared:
        return f"{notebook.name} has no cell tagged 'parameters'."
    width = max(map(len, declared))
    lines = [f"parameters of {notebook.name} (its parameters cell; it names no workflow); set with -p NAME VALUE:"]
    for name, info in declared.items():
        lines.append(f"  {name:<{width}}  {info['type'] or 'any':<5} = {info['default']:<12} {info['help'] or ''}")
    return "\n".join(lines)


def _cmd_predict(args) -> int:
    import warnings

    from .predict import load_run, version_note

    options = {k: v for k, v in {"output": args.what, "batch_size": args.batch_size,
                                 "max_missing": args.max_missing, "fold": args.fold}.items() if v is not None}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the version note is printed below
        predictor = load_run(args.run_dir)
    if predictor.version_differences:
        print(f"workbench predict: {version_note(predictor.version_differences)}", file=sys.stderr)
    predictions = predictor.predict(args.data, **options)  # errors (PredictError is a ValueError): exit 2
    print(predictions.report.summary())
    written = [predictions.write(out) for out in args.output]
    print(f"{len(predictions)} predictions ({time.perf_counter() - start:.1f} s): "
          + ", ".join(str(p) for p in written))
    return 0


def _cmd_run(args) -> int:
    from .execute import run_notebook
    from .tracking import new_run_dir

    if args.list:
        return _cmd_workflows(args)
    if args.notebook is None:
        if args.help:
            print(args.parser.format_help())
            return 0
        raise ValueError("give a notebook or the name of a registered workflow (workbench workflows lists them).")
    args.notebook, workflow = _resolve_notebook(args.notebook)
    if args.help:
        print(args.parser.format_help())
        print(_notebook_help(args.notebook, workflow))
        return 0
    if args.log_output:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill logs the output at INFO
    out = args.output_dir or new_run_dir(Path("runs") / args.notebook.stem)
    params = {}
    for name, value in args.parameter:
        if name in params:
            raise ValueError(f"parameter {name!r} is given twice (-p {name} {params[name]} and -p {name} {value}).")
        params[name] = value
    if args.nproc > 1:
        return _run_distributed(args, params, Path(out))
    result = run_notebook(args.notebook, parameters=params, output_dir=out, kernel_name=args.kernel,
                          timeout=args.timeout, log_output=args.log_output, overwrite=args.overwrite)
    if not result.ok:
        print(f"workbench run: {args.notebook.name} failed: {result.error}\n"
              f"  executed notebook with the traceback: {result.notebook_path}", file=sys.stderr)
        return 1
    print(f"run folder: {result.output_dir} ({result.seconds:.1f} s)")
    if result.final_metrics:
        print(_metrics_table(result.final_metrics))
    return 0


def _run_distributed(args, params: dict, out: Path) -> int:
    """``workbench run --nproc N``: check everything here, then torchrun N ranks of :mod:`workbench.launch`."""
    import subprocess

    from .execute import prepare_run_folder
    from .launch import backend_environment, torchrun_command

    env = backend_environment(args.nproc, args.backend)  # refuses --nproc above the GPUs before any work
    _, out = prepare_run_folder(args.notebook, params, out, overwrite=args.overwrite)
    start = time.perf_counter()
    done = subprocess.run(torchrun_command(args.notebook, params, out, nproc=args.nproc), env=env)
    if done.returncode != 0:
        print(f"workbench run: {args.notebook.name} failed on {args.nproc} processes (exit {done.returncode}); "
              f"the ranks' tracebacks are above. Run folder: {out}", file=sys.stderr)
        return 1
    print(f"run folder: {out} ({time.perf_counter() - start:.1f} s, {args.nproc} processes)")
    metrics = out / "final_metrics.json"
    if metrics.is_file():
        print(_metrics_table(json.loads(metrics.read_text())))
    return 0


def _cmd_sweep(args) -> int:
    import warnings

    from .sweeps import StaleRunsWarning, SweepLockedError, load_spec, run_sweep

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StaleRunsWarning)  # said below, with the command-line option
            result = run_sweep(args.spec, workers=args.workers, executor=args.executor, scheduler=args.scheduler,
                               kernel_name=args.kernel, timeout=args.timeout, rerun_stale=args.rerun_stale)
    except SweepLockedError as err:
        print(f"workbench sweep: error: {err}", file=sys.stderr)
        return 2
    print(f"sweep {result.name}: {result.n_runs} runs, {result.n_failed} failed, {result.n_executed} executed now")
    from .workflow import headline_metrics

    headline = _headline(result.summary, [result.metric, *headline_metrics(load_spec(args.spec).notebook)])
    print(headline.to_string(index=False, na_rep=""))
    print(f"results: {result.path / 'results.csv'}\nsummary: {result.path / 'summary.csv'}")
    if result.n_stale:
        print(f"sweep {result.name}: {result.n_stale} finished run(s) were made by an earlier or unknown version "
              f"of the notebook; their results are kept. To run them again: workbench sweep {args.spec} --rerun-stale")
    if result.n_failed:
        failed = result.results[result.results["status"] == "failed"]
        lines = "\n".join(f"  {row.run_id}: {row.error}" for row in failed.itertuples())
        print(f"workbench sweep: {result.n_failed} run(s) failed:\n{lines}", file=sys.stderr)
        return 1
    return 0


def _headline(summary, metrics):
    """The columns worth reading in a terminal: the setting, counts, and the headline metrics.

    summary.csv keeps every metric; this picks ``metrics`` (the sweep's own metric, then the
    workflow's ``HEADLINE_METRICS``), mean and std of each, where present. With none of them
    present it shows everything.
    """
    columns = ["setting", "n", "n_failed"]
    for name in dict.fromkeys(m for m in metrics if m):
        columns += [c for c in (f"{name}_mean", f"{name}_std") if c in summary.columns and c not in columns]
    if len(columns) == 3:
        return summary
    return summary[[c for c in columns if c in summary.columns]].round(4)


def _notebook_of_sweep(folder: Path) -> str | None:
    """The notebook a sweep folder's runs executed (recorded in each run's status.json)."""
    for status in sorted(folder.glob("*/status.json")):
        try:
            notebook = json.loads(status.read_text()).get("notebook")
        except (OSError, ValueError):
            continue
        if notebook:
            return notebook
    return None


def _cmd_report(args) -> int:
    folder = args.folder
    if (folder / "summary.csv").is_file():
        import pandas as pd

        from .workflow import headline_metrics

        summary = pd.read_csv(folder / "summary.csv")
        print(f"sweep {folder.name}")
        print(_headline(summary, headline_metrics(_notebook_of_sweep(folder))).to_string(index=False, na_rep=""))
        if (folder / "results.csv").is_file():
            results = pd.read_csv(folder / "results.csv")
            failed = results[results["status"] != "ok"]
            print(f"{len(results)} runs, {len(failed)} not ok")
            for row in failed.itertuples():
                print(f"  {row.run_id}: {row.status}: {'' if pd.isna(row.error) else row.error}")
        return _report_figures(args)
    if (folder / "results.csv").is_file():  # a sweep folder whose summary.csv is missing
        raise FileNotFoundError(f"{folder} has results.csv but no summary.csv; run the sweep again to rewrite both.")
    files = {name: folder / f"{name}.json" for name in ("params", "final_metrics", "status")}
    if not any(path.is_file() for path in files.values()):
        raise FileNotFoundError(f"{folder} holds neither summary.csv (a sweep folder) nor params.json / "
                                "final_metrics.json (a run folder). Pass the folder a sweep or a run wrote.")
    print(f"run {folder}")
    content = {name: json.loads(path.read_text()) if path.is_file() else {} for name, path in files.items()}
    status = content["status"]
    if status:
        print(f"status: {'ok' if status.get('ok') else 'failed'}" + (f": {status['error']}" if status.get("error") else ""))
    if content["params"]:
        print("params:\n" + _metrics_table(content["params"]))
    if content["final_metrics"]:
        print("final metrics:\n" + _metrics_table(content["final_metrics"]))
    if args.html and (folder / "notebook.ipynb").is_file():
        from .report import render_notebook

        print(f"executed notebook as HTML: {render_notebook(folder / 'notebook.ipynb')}")
    return 0


def _report_figures(args) -> int:
    """The sweep's figure (``figure.png``), its gap table and, with --html, ``report.html``."""
    from .report import choose_figure, load_result, save_figure, transfer_gap, write_html

    folder = args.folder
    if not (folder / "results.csv").is_file():
        return 0
    result = load_result(folder)
    if not (result.results["status"] == "ok").any():
        print("no run finished ok yet: no figure")
    else:
        choice = choose_figure(result, x=args.x, hue=args.hue, metric=args.metric)
        figure = save_figure(result, folder / "figure.png", x=choice.x, hue=choice.hue, metric=choice.metric)
        print(f"figure: {figure} ({choice.metric} {'against' if choice.kind == 'curve' else 'per'} {choice.x}"
              + (f", colour {choice.hue}" if choice.hue else "") + ")")
        gap = transfer_gap(result, x=choice.x, hue=choice.hue, metric=choice.metric)
        if gap is not None and len(gap):
            print(f"gap in {choice.metric}, {gap.attrs['hue']}={gap.attrs['a']} minus {gap.attrs['b']} "
                  f"(mean ± std{' over seeds, paired' if gap.attrs['paired'] else ''}):")
            print(gap.round(4).to_string(index=False))
    if args.html:
        print(f"report: {write_html(result, x=args.x, hue=args.hue, metric=args.metric)}")
    return 0


def _metrics_table(values: dict) -> str:
    width = max(len(str(k)) for k in values)
    return "\n".join(f"  {str(k):<{width}}  {v}" for k, v in values.items())


if __name__ == "__main__":
    sys.exit(main())
