"""Parameter constraints declared as data, checked before any work starts.

Each workflow declares what its notebook's parameters accept, once, as data (the shape of
scikit-learn's ``_parameter_constraints``)::

    PARAMETERS = Spec(
        lr_scheduler_type=Choice(*SCHEDULES),
        learning_rate=Real(gt=0),
        epochs=Integer(ge=1),
        label_fraction=Real(gt=0, le=1),
        pretrained_checkpoint=Choice("pretrain", "none", or_path=True),
        data_path=Text(),
    )

The same declaration is checked in three places, so a typo fails in a second instead of after
pretraining: ``workbench run`` and :func:`workbench.run_notebook` before the kernel starts,
``workbench sweep`` for every run of the grid when the spec is loaded (before any run begins),
and the notebook's own second cell (``params = task.WORKFLOW.check(wb.params_of(globals()))``)
for interactive edits. Every problem is reported at once, each with what was given, what is
accepted and, for a near miss, the closest accepted value.

Types are the notebook's business (its parameters cell declares them, and
:func:`workbench.execute.coerce_parameters` converts to them); a :class:`Spec` adds what a type
cannot say: choices, ranges, and paths that must exist.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real as _RealNumber
from pathlib import Path

__all__ = ["ParameterError", "Constraint", "Choice", "Integer", "Real", "Text", "Flag", "Spec"]


class ParameterError(ValueError):
    """One or more parameters have values the workflow does not accept; the message lists each."""

    def __init__(self, problems: list[str], *, where: str = ""):
        self.problems, self.where = list(problems), where
        head = f"{where}: " if where else ""
        if len(problems) == 1:
            super().__init__(head + problems[0])
        else:
            super().__init__(head + f"{len(problems)} parameters are not accepted:\n  - " + "\n  - ".join(problems))


class Constraint:
    """What one parameter accepts. ``problem(name, value)`` returns None or one sentence."""

    def problem(self, name: str, value) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True, init=False)
class Choice(Constraint):
    """One of ``options`` (compared as given); with ``or_path=True`` also an existing file or folder path."""

    options: tuple
    or_path: bool = False

    def __init__(self, *options, or_path: bool = False):
        if not options:
            raise ValueError("Choice needs at least one option.")
        object.__setattr__(self, "options", tuple(options))
        object.__setattr__(self, "or_path", or_path)

    def describe(self) -> str:
        return "one of " + ", ".join(map(str, self.options)) + (", or a path that exists" if self.or_path else "")

    def problem(self, name, value):
        if value in self.options:
            return None
        if self.or_path and isinstance(value, str) and value:
            if Path(value).expanduser().exists():
                return None
            hint = _closest(value, self.options)
            return (f"{name}={value!r} is not one of {', '.join(map(str, self.options))}, and no file or folder "
                    f"exists at that path (looked from {Path.cwd()})." + (f" Did you mean {hint!r}?" if hint else
                                                                          " Give an existing path."))
        hint = _closest(value, self.options)
        return (f"{name}={value!r} is not one of {', '.join(map(str, self.options))}."
                + (f" Did you mean {hint!r}?" if hint else ""))


@dataclass(frozen=True)
class _Interval(Constraint):
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    allow: tuple = ()  # special values accepted besides the interval (e.g. 0 meaning "off")

    kind = "number"

    def describe(self) -> str:
        parts = []
        if self.gt is not None:
            parts.append(f"> {self.gt:g}")
        if self.ge is not None:
            parts.append(f">= {self.ge:g}")
        if self.lt is not None:
            parts.append(f"< {self.lt:g}")
        if self.le is not None:
            parts.append(f"<= {self.le:g}")
        text = f"a{'n' if self.kind[0] in 'aeiou' else ''} {self.kind}" + (" " + " and ".join(parts) if parts else "")
        return text + (f" (or {', '.join(map(repr, self.allow))})" if self.allow else "")

    def _type_ok(self, value) -> bool:
        return isinstance(value, _RealNumber) and not isinstance(value, bool)

    def problem(self, name, value):
        if value in self.allow and not isinstance(value, bool):
            return None
        if not self._type_ok(value):
            return f"{name}={value!r} is not {self.describe()}."
        if isinstance(value, float) and math.isnan(value):
            return f"{name}=nan is not {self.describe()}."
        bad = ((self.gt is not None and not value > self.gt) or (self.ge is not None and not value >= self.ge)
               or (self.lt is not None and not value < self.lt) or (self.le is not None and not value <= self.le))
        return f"{name}={value!r} is not {self.describe()}." if bad else None


class Integer(_Interval):
    """A whole number, optionally bounded: ``Integer(ge=1)``; ``allow=(0,)`` adds special values."""

    kind = "integer"

    def _type_ok(self, value) -> bool:
        return isinstance(value, Integral) and not isinstance(value, bool)


class Real(_Interval):
    """A number (an int is accepted), optionally bounded: ``Real(gt=0, le=1)``."""

    kind = "number"


@dataclass(frozen=True)
class Text(Constraint):
    """Any string; ``nonempty=True`` refuses ''."""

    nonempty: bool = False

    def describe(self) -> str:
        return "a non-empty string" if self.nonempty else "a string"

    def problem(self, name, value):
        if not isinstance(value, str) or (self.nonempty and not value):
            return f"{name}={value!r} is not {self.describe()}."
        return None


@dataclass(frozen=True)
class Flag(Constraint):
    """True or False."""

    def describe(self) -> str:
        return "True or False"

    def problem(self, name, value):
        return None if isinstance(value, bool) else f"{name}={value!r} is not True or False."


class Spec(Mapping):
    """The constraints of a workflow's parameters: ``Spec(name=Constraint, ...)``.

    A mapping from parameter name to :class:`Constraint`. Names it does not list are not checked
    here (the notebook's parameters cell still checks names and types).
    """

    def __init__(self, **constraints: Constraint):
        for name, constraint in constraints.items():
            if not isinstance(constraint, Constraint):
                raise TypeError(f"Spec({name}=...) must be a Constraint (Choice, Integer, Real, Text, Flag), "
                                f"got {constraint!r}.")
        self._constraints = dict(constraints)

    def __getitem__(self, name):
        return self._constraints[name]

    def __iter__(self):
        return iter(self._constraints)

    def __len__(self):
        return len(self._constraints)

    def problems(self, params: Mapping) -> list[str]:
        """One sentence per parameter in ``params`` whose value is not accepted."""
        out = []
        for name, value in params.items():
            constraint = self._constraints.get(name)
            problem = constraint.problem(name, value) if constraint is not None else None
            if problem:
                out.append(problem)
        return out

    def check(self, params: Mapping, *, where: str = "") -> dict:
        """Return ``dict(params)`` if every value is accepted; raise :class:`ParameterError` listing all problems."""
        problems = self.problems(params)
        if problems:
            raise ParameterError(problems, where=where)
        return dict(params)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"accepts": {k: c.describe() for k, c in self._constraints.items()}}).rename_axis("parameter")

    def to_dict(self) -> dict:
        return {k: c.describe() for k, c in self._constraints.items()}

    def _repr_html_(self) -> str:
        return self.to_frame().to_html()

    def __repr__(self) -> str:
        return f"Spec({', '.join(f'{k}: {c.describe()}' for k, c in self._constraints.items())})"


def _closest(value, options) -> str | None:
    if not isinstance(value, str):
        return None
    words = [str(o) for o in options]
    match = difflib.get_close_matches(value, words, n=1, cutoff=0.6)
    return match[0] if match else None
