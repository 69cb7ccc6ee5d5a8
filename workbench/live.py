"""Live training curves in a notebook: an interface piece, kept out of the core loop.

:class:`LiveCurves` is a :class:`workbench.training.Callback` that redraws the history with
:func:`workbench.plots.plot_history` and IPython's display after every epoch. ``training.py`` knows
models and batches and imports no plotting; the notebooks pass ``wb.LiveCurves(enabled=interactive)``
to ``fit(callbacks=...)``, and the widget panel's :class:`workbench.widgets.OutputCurves` builds on it.
"""

from __future__ import annotations

from .training import Callback

__all__ = ["LiveCurves"]


class LiveCurves(Callback):
    """Redraw the training curves in the notebook after every epoch; one figure per cell.

    The cell ends with ``curves.final(fig)``: the live figure is replaced by the final one (the
    best epoch marked), and nothing is shown twice; when nothing was drawn live, ``final``
    returns ``fig`` for the cell to show.

    Parameters
    ----------
    enabled
        False makes it inert (headless runs), so a notebook can always pass it.
    """

    def __init__(self, *, enabled: bool = True):
        self.enabled = enabled
        self.handle = None

    def on_epoch_end(self, trainer, logs):
        if not self.enabled or not trainer.is_main:
            return
        from .plots import plot_history

        self._show(plot_history(trainer.history))

    def _show(self, fig) -> None:
        from IPython.display import display

        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)

    def final(self, fig):
        """Show ``fig`` in place of the live curves; return it when there were none."""
        if self.handle is None:
            return fig
        self.handle.update(fig)
        return None
