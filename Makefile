# Every target bootstraps .venv itself, so a fresh clone needs only `make demo` or `make test`.
# No MPLBACKEND here: exported variables reach every Jupyter kernel, and a non-inline backend turns figures
# into text under `make lab`. The workbench kernelspec sets the inline backend itself (execute.ensure_kernel).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
WB     := $(VENV)/bin/workbench
STAMP  := $(VENV)/.installed
# Optional extras every workflow and test needs (environment.yml installs the same list).
EXTRAS := test,lab,lora,spatial,sequences
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: help venv demo test test-browser lab sweep bench gpu-check docs docs-clean clean

help:
	@echo "make demo   - cell-type annotation on scanpy's bundled pbmc68k_reduced (real data)"
	@echo "make test   - the test suite (executes the notebooks with tiny parameters)"
	@echo "make lab    - JupyterLab with the project's kernel"
	@echo "make sweep  - constant vs cosine LR sweep (notebooks/sweeps/lr_schedule.yaml)"
	@echo "make docs   - the docs site into docs/_build/html (executes the workflow notebooks first, cached)"
	@echo "make bench  - loop parity, DDP scaling, sweep overhead, atlas streaming, CoLES throughput, LoRA memory -> benchmarks/results/"
	@echo "make gpu-check - every workflow on the GPU vs the CPU, bf16 loop parity, largest batch, fp16 resume, NCCL -> benchmarks/results/gpu_check.json"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS)]"
	$(PY) -m ipykernel install --sys-prefix --name workbench --display-name "Python (workbench)" >/dev/null
	$(PY) -c "from workbench.execute import ensure_kernel; ensure_kernel()"  # figures inline in every kernel
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(WB) run notebooks/cell_type_annotation.ipynb -o runs/demo

# The import contracts first (pyproject.toml's [tool.importlinter]: layers, independent workflows, no circles; under
# a second), then two pytest workers (pytest-xdist), each taking whole test files (tests of a file share fixtures and
# run in order). Most tests wait on subprocesses (kernels, torchrun, Dask), so two workers keep both cores busy.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -n 2 --dist loadfile

# Real-browser tests of `make lab`'s path, the sweep report and the docs site; `make test` skips them
# (screenshots: runs/browser/). The docs site is built first (a no-op when nothing changed).
test-browser: $(STAMP) docs
	$(PY) -m pytest -q tests/browser

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

sweep: $(STAMP)
	$(WB) sweep notebooks/sweeps/lr_schedule.yaml --workers 2

bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[bench]" || echo "lightning unavailable: loop_parity runs without it"
	$(PY) benchmarks/loop_parity.py
	$(PY) benchmarks/ddp_scaling.py
	$(PY) benchmarks/sweep_overhead.py
	$(PY) benchmarks/anndata_stream.py
	$(PY) benchmarks/coles_throughput.py --clients 600 --repeats 5 --threads 1
	$(PY) benchmarks/lora_memory.py

# Under 5 minutes on one GPU; without a GPU it says so and exits 0.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

# The docs site: execute the workflow notebooks at docs/notebooks.yaml's settings (skipped when unchanged), then
# Sphinx with warnings as errors, offline. Sphinx rebuilds only the pages whose sources changed.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[$(EXTRAS),docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) docs/execute_notebooks.py
	$(PY) -m sphinx -W --keep-going -n -b html docs docs/_build/html

docs-clean:
	rm -rf docs/_build docs/_executed docs/workflows/*.ipynb docs/generated

clean:
	rm -rf runs/ wandb/ .pytest_cache/
