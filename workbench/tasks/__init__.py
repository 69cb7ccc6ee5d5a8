"""One module per workflow: its data, its model and its pretraining objective.

- :mod:`workbench.tasks.cell_type`: cell-type annotation from single-cell expression.
"""
