"""Resolve the short names the docstrings use (``wb.fit``'s ``workbench.fit``, ``Run``, ``PRETRAIN_SETTINGS``).

The package re-exports its main names at the top level (``workbench.fit`` is ``workbench.training.fit``), and its
docstrings refer to them that way, or by a bare name of the same module. Sphinx documents each object once, under
its module, so such a reference would be left unresolved. This handler resolves it to the documented object:
``workbench.X`` for a top-level export, else a name of the referring module, else the one documented object whose
name ends with it. Anything still unresolved stays a warning (and ``-W`` an error).
"""

from __future__ import annotations

from sphinx.util import logging

logger = logging.getLogger(__name__)


def candidates(target: str, module: str | None, exports: dict[str, str]) -> list[str]:
    """Full names to try for ``target``, most specific first."""
    names = []
    head, _, rest = target.partition(".")
    if target.startswith("workbench.") and target.split(".")[1] in exports:
        name = target.split(".", 1)[1]
        names.append(f"workbench.{exports[name.split('.')[0]]}.{name}")
    if head in exports:
        names.append(f"workbench.{exports[head]}.{target}")
    if module:
        names.append(f"{module}.{target}")
    return names


def resolve(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    from workbench import _EXPORTS

    domain = env.get_domain("py")
    target = node["reftarget"].lstrip("~.")
    objects = domain.objects
    found = [name for name in candidates(target, node.get("py:module"), _EXPORTS) if name in objects]
    if not found and "." not in target or target.startswith("workbench."):
        short = target.split(".")[-1] if target.startswith("workbench.") else target
        ending = [name for name in objects if name.startswith("workbench.") and name.endswith("." + short)]
        if len(ending) == 1:
            found = ending
    if not found:
        return None
    return domain.resolve_xref(env, node["refdoc"], app.builder, "obj", found[0], node, contnode)


def setup(app):
    app.connect("missing-reference", resolve)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
