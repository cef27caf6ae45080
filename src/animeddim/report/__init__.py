"""Figures and tables of the paper, made from run folders on disk only.

`write_report` reads what `animeddim train` (and `evaluate`, and a steps study) left in
each run folder -- config.json, metrics.csv, reference.png, samples/, eval-*.json,
steps.csv, checkpoints/last.safetensors -- and writes the paper's Fig. 1, 3 and 4 and
Tables I and II next to a Markdown page and a self-contained HTML page. It never
touches live training state: what a report shows is what is on disk.

Every number travels with its protocol: the per-epoch KID in metrics.csv is the paper
(Keras-example) protocol, eval-*.json files name their own protocol, and the losses are
mean absolute errors, so the page says which is which beside each table and figure.

Figures are drawn with matplotlib's object API (`matplotlib.figure.Figure`, rendered by
the Agg canvas when saved to PNG): no pyplot, so no global backend is selected or
switched, nothing needs a display, and importing this module imports no matplotlib.
"""

from ..run_folder import RunFolderError
from .figures import (  # noqa: F401 - _figure: coverage draws its figures the same way
    _figure,
    plot_forward,
    plot_kid,
    plot_losses,
    plot_reverse,
    plot_steps,
    save_figure,
)
from .page import ReportError, write_report
from .tables import Table, cell_text, evals_table, sampler_label, steps_table, table1, table2

__all__ = [
    "ReportError",
    "RunFolderError",
    "Table",
    "cell_text",
    "evals_table",
    "plot_forward",
    "plot_kid",
    "plot_losses",
    "plot_reverse",
    "plot_steps",
    "sampler_label",
    "save_figure",
    "steps_table",
    "table1",
    "table2",
    "write_report",
]
