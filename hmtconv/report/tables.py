"""Readable tables (markdown, which also reads well in a terminal)."""
from __future__ import annotations


def markdown_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"
    return "" if value is None else str(value)


def curves_table(runs: dict[str, dict]) -> str:
    """One row per run: ANN accuracy, SNN accuracy at every t, then the energy ratio at every t
    (none for a module-swapped model, whose operations are not counted)."""
    steps = max(len(r["snn_accuracy"]) for r in runs.values())
    header = ["run", "ANN %"] + [f"t={t}" for t in range(1, steps + 1)]
    rows = []
    for label, result in runs.items():
        acc = list(result["snn_accuracy"]) + [None] * (steps - len(result["snn_accuracy"]))
        rows.append([label, result.get("ann_accuracy")] + acc)
    for label, result in runs.items():
        if result["energy_ratio"] is None:
            continue
        energy = list(result["energy_ratio"]) + [None] * (steps - len(result["energy_ratio"]))
        rows.append([f"{label} energy", None] + energy)
    return markdown_table(header, rows)


def site_synops(layers: list[dict]) -> list[float] | None:
    """Each site's accumulates per sample over all steps; None where energy was not counted (or in
    records written before they were kept)."""
    synops = [(layer.get("synops_cumulative") or [None])[-1] for layer in layers]
    return None if None in synops else synops


def layers_table(result: dict) -> str:
    """One row per spiking site: lam, firing rate, conversion error and, where energy was counted,
    the accumulates its spikes drive per sample over all steps and their share of the total."""
    layers = result["per_layer"]
    synops = site_synops(layers)
    counted = synops is not None
    total = sum(synops) if counted else 0
    header = ["layer", "lam", "firing rate", "mean |ANN - SNN|"] + (["SOPs/sample", "% of SOPs"] if counted else [])
    rows = []
    for layer, sops in zip(layers, synops or [None] * len(layers)):
        lam = layer["lam"]
        lam = f"{lam:.4g}" if isinstance(lam, (int, float)) else f"{len(lam)} ch, {min(lam):.3g}..{max(lam):.3g}"
        share = [f"{sops:.4g}", 100 * sops / total if total else None] if counted else []
        rows.append([layer["name"], lam, layer["firing_rate"], layer["mean_abs_error"]] + share)
    return markdown_table(header, rows)
