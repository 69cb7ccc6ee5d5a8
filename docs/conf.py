"""Sphinx configuration of the workbench docs site (`make docs`; the pages are MyST markdown and notebooks)."""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # the package documented is this checkout's
sys.path.insert(0, str(DOCS / "_ext"))

project = "workbench"
author = "the workbench authors"
copyright = "the workbench authors"
from workbench import __version__ as release  # noqa: E402

version = release

extensions = [
    "myst_nb",  # MyST markdown pages and executed notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "sphinx.ext.intersphinx",
    "sphinxarg.ext",
    "results_table",
    "short_refs",
]

exclude_patterns = ["_build", "_executed", "workflows/parts", "results", "**.ipynb_checkpoints", "README.md"]
templates_path = ["_templates"]
html_static_path = []

# Notebooks are executed before Sphinx runs (docs/execute_notebooks.py) and rendered as they are.
nb_execution_mode = "off"
nb_output_stderr = "remove"  # progress bars and library warnings; the results are in the outputs and figures
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# API reference: autosummary writes a page per public object; numpydoc reads the docstrings.
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"  # no second, bare parameter list on dataclasses
autodoc_mock_imports = []
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()

# Offline: intersphinx has no inventories to fetch, so a reference to torch or numpy stays plain text.
intersphinx_mapping = {}
# -n (nitpicky): every reference to a workbench object must resolve; names from other packages (torch, numpy,
# pandas, the standard library) have no inventory offline and stay plain text.
nitpick_ignore_regex = [
    ("py:.*", r"(numpy|np|torch|nn|os|pathlib|Path|collections|typing|pandas|pd|matplotlib|scipy|anndata|sklearn"
              r"|Module|generator|optional)(\..*)?"),
    # names the docstrings mention that are outside the modules' __all__ (so not on the API pages)
    ("py:.*", r"(workbench\..*\.)?(CVResult|Trainer|_Interval|CropBatches|History\.best_epoch|last_result"
              r"|last_lr_find|cells|PRETRAIN_SETTINGS|BACKED_AUTO_BYTES|PREDICT_CHUNK|NUMERIC|CATEGORICAL"
              r"|MIN_SECONDS|BASELINE_MAX_CELLS|BANDS)"),
]

html_theme = "furo"
html_title = f"workbench {release}"
html_theme_options = {"source_repository": "", "navigation_with_keys": True}
suppress_warnings = ["myst.header"]  # notebooks start at their own heading levels
