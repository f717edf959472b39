"""Results as JSON (atomic writes, full provenance), markdown tables and PNG plots."""
from .io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from .plots import plot_curves, plot_layers, plot_tradeoff
from .provenance import git_commit, jsonable, provenance
from .sweep_report import write_reports
from .tables import curves_table, layers_table, markdown_table

__all__ = ["append_jsonl", "atomic_write_json", "atomic_write_text", "read_jsonl", "plot_curves",
           "plot_layers", "plot_tradeoff", "git_commit", "jsonable", "provenance", "curves_table", "layers_table",
           "markdown_table", "write_reports"]
