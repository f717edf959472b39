"""Plots of evaluation results, PNG unless the file name says otherwise (matplotlib, Agg backend: no
display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

from ..atomic import atomic_path  # noqa: E402
from ..errors import UserError  # noqa: E402
from .tables import site_synops  # noqa: E402


def plot_format(path) -> str:
    """The image format ``path`` names by its suffix, ``png`` if it has none; a UserError for a
    suffix matplotlib cannot write."""
    suffix = Path(path).suffix
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix[1:].lower() not in formats:
        raise UserError(f"cannot plot to {path}: matplotlib cannot write {suffix} files; name it .png "
                        f"(or {', '.join(sorted(formats))})")
    return suffix[1:].lower() or "png"


def _save(fig, path) -> Path:
    try:
        image_format = plot_format(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=image_format, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def _style(i: int) -> dict:
    """The i-th line's colour and dash: matplotlib's 10 colours, then again with other dashes."""
    return {"color": f"C{i % 10}", "ls": ("-", "--", ":", "-.")[i // 10 % 4]}


def plot_curves(runs: dict[str, dict], path, *, title: str = "", xlabel: str = "time step t") -> Path:
    """Accuracy (with the ANN line) and energy ratio vs t, one line per labelled run; a run's
    ``"t"`` list, if present, gives the x values (e.g. the T of separate conversions)."""
    fig, (acc_ax, energy_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    ann = None
    for i, (label, result) in enumerate(runs.items()):
        steps = result.get("t", range(1, len(result["snn_accuracy"]) + 1))
        acc_ax.plot(steps, result["snn_accuracy"], marker="o", ms=3, label=label, **_style(i))
        if result["energy_ratio"] is not None:  # (None: a module-swapped model, not counted)
            energy_ax.plot(steps, result["energy_ratio"], marker="o", ms=3, label=label, **_style(i))
        ann = result.get("ann_accuracy") if ann is None else ann
    if ann is not None:
        acc_ax.axhline(ann, color="black", ls="--", lw=1, label=f"ANN {ann:.2f}%")
    acc_ax.set(xlabel=xlabel, ylabel="top-1 accuracy (%)", title="SNN accuracy")
    energy_ax.axhline(1.0, color="gray", ls=":", lw=1)
    energy_ax.set(xlabel=xlabel, ylabel="E_SNN / E_ANN (eqs. 31-32)", title="Energy ratio")
    for ax in (acc_ax, energy_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_layers(result: dict, path, *, title: str = "") -> Path:
    """Per replaced module: firing rate, the accumulates its spikes drive (where energy was
    counted) and the mean |ANN activation - SNN average output|."""
    layers = result["per_layer"]
    names = [layer["name"] for layer in layers]
    synops = site_synops(layers)
    counted = synops is not None
    fig, axes = plt.subplots(3 if counted else 2, 1, figsize=(max(6, 0.45 * len(names) + 2), 9.5 if counted else 6.5),
                             sharex=True)
    rate_ax, err_ax = axes[0], axes[-1]
    positions = range(len(names))
    rate_ax.bar(positions, [layer["firing_rate"] for layer in layers], color="tab:blue")
    rate_ax.set(ylabel="spikes per neuron per step", title="Firing rate")
    if counted:
        axes[1].bar(positions, synops, color="tab:green")
        axes[1].set(ylabel="accumulates per sample", title="Synaptic operations its spikes drive (all steps)")
    errors = [layer["mean_abs_error"] for layer in layers]  # (None: not measured, diagnostics off)
    err_ax.bar(positions, [float("nan") if e is None else e for e in errors], color="tab:red")
    err_ax.set(ylabel="mean |ANN - SNN avg|",
               title="Conversion error" + (" (not measured)" if None in errors else ""))
    err_ax.set_xticks(list(positions), names, rotation=60, ha="right", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_tradeoff(points: list[dict], path, *, title: str = "") -> Path:
    """Accuracy vs energy ratio, one marker series per label (the trade-off front)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    labels = list(dict.fromkeys(p["label"] for p in points))  # first-seen order: colours match plot_curves
    for i, label in enumerate(labels):
        mine = sorted((p for p in points if p["label"] == label), key=lambda p: p["energy_ratio"])
        ax.plot([p["energy_ratio"] for p in mine], [p["accuracy"] for p in mine], marker="o", ms=4, label=label,
                **_style(i))
    ax.set(xlabel="energy ratio E_SNN / E_ANN", ylabel="top-1 accuracy (%)", title=title or "Accuracy vs energy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
