"""A sweep's ``table.md`` and plots, from its records (one JSON object per grid point)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .io import atomic_write_text
from .plots import plot_curves, plot_tradeoff
from .tables import curves_table, markdown_table


def _label(record: dict, varying: list[str]) -> str:
    return " ".join(f"{k}={record[k]}" for k in varying) or "snn"


def _by_T(records: list[dict], keys: list[str]) -> dict[str, dict]:
    """One curve per setting of ``keys``: the final-step result of each T, in T order."""
    curves: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: r["T"]):
        curve = curves.setdefault(_label(r, keys), {"t": [], "snn_accuracy": [], "energy_ratio": [],
                                                    "ann_accuracy": r["result"]["ann_accuracy"]})
        curve["t"].append(r["T"])
        curve["snn_accuracy"].append(r["result"]["snn_accuracy"][-1])
        curve["energy_ratio"].append((r["result"]["energy_ratio"] or [float("nan")])[-1])
    return curves


def by_T_table(records: list[dict], keys: list[str]) -> str:
    """The paper's table layout: one row per setting of ``keys`` and measure, one column per T."""
    steps = sorted({r["T"] for r in records})
    cells: dict[tuple[str, str], dict[int, float | None]] = {}
    for r in records:
        result, label = r["result"], _label(r, keys)
        for measure, values in (("top-1", result["snn_accuracy"]), ("agreement", result.get("agreement")),
                                ("energy", result["energy_ratio"])):
            cells.setdefault((label, measure), {})[r["T"]] = None if values is None else values[-1]
    ann = records[0]["result"]["ann_accuracy"]
    rows = [[label, measure, *(by_step.get(t) for t in steps)] for (label, measure), by_step in cells.items()
            if any(v is not None for v in by_step.values())]
    return markdown_table([f"setting (ANN {ann:.2f}%)" if ann is not None else "setting", "measure",
                           *(f"T={t}" for t in steps)], rows)


def threshold_ratios(records: list[dict], keys: list[str]) -> str | None:
    """Each policy's per-site lam over opt's at the same setting (how far from the converged
    optimum the published fixed point or a percentile lands); None without opt in the grid."""
    def lams(record):  # per-channel lam lists are flattened: the ratio is taken channel by channel
        return torch.tensor([x for layer in record["result"]["per_layer"]
                             for x in (layer["lam"] if isinstance(layer["lam"], list) else [layer["lam"]])])
    opt = {_label(r, keys): lams(r) for r in records if r["policy"] == "opt"}
    rows = []
    for r in records:
        reference = opt.get(_label(r, keys))
        if r["policy"] == "opt" or reference is None:
            continue
        ratio = lams(r) / reference
        rows.append([_label(r, keys), str(r["policy"]), f"{ratio.median().item():.3g} [{ratio.min().item():.3g}, "
                     f"{ratio.max().item():.3g}]"])
    return markdown_table(["setting", "policy", "lam / lam_opt"], rows) if rows else None


def longest_of_each_run(records: list[dict], grid_keys: tuple[str, ...]) -> list[dict]:
    """A run answers the smaller T of T-independent policies too: its record of the largest T in
    ``records``, which holds the others' steps (the run's own T may be left out of this grid)."""
    longest: dict[str, dict] = {}
    for r in records:
        run = json.dumps([[r[k] for k in grid_keys if k != "T"], r.get("simulated_T", r["T"])])
        if run not in longest or r["T"] > longest[run]["T"]:
            longest[run] = r
    return list(longest.values())


def _file_stems(models) -> dict[str, str]:
    """A plot file-name stem per model: characters a file name cannot hold become ``_``; models
    whose stems then collide (``hf:a/b`` and ``hf:a_b``) get ``-2``, ``-3``... so no plot is lost."""
    stems: dict[str, str] = {}
    for model in models:
        stem = base = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
        count = 1
        while stem in stems.values():
            count += 1
            stem = f"{base}-{count}"
        stems[model] = stem
    return stems


PLOTS = ("by-T-*.png", "curves-*.png", "tradeoff-*.png")  # what write_reports draws, per model


def write_reports(records: list[dict], out: Path, grid_keys: tuple[str, ...]) -> None:
    """``table.md`` (final-step accuracy and energy of every point, and full curves) and PNG plots;
    plots of an earlier report that this one does not make (other models, T no longer varying) are
    removed, so the folder shows one report."""
    varying = [k for k in grid_keys if len({json.dumps(r[k]) for r in records}) > 1]
    header = ["model", *grid_keys, "ANN %", "SNN % at T", "agreement at T", "energy at T", "spikes/sample"]
    # grid values as given (str): the table's number format would show a percentile 99.999 as 100.00
    rows = [[r["model"], *(str(r[k]) for k in grid_keys), r["result"]["ann_accuracy"], r["result"]["snn_accuracy"][-1],
             (r["result"].get("agreement") or [None])[-1],
             (r["result"]["energy_ratio"] or [None])[-1], r["result"]["spikes_per_sample"]] for r in records]
    sections = ["# Sweep results", "", markdown_table(header, rows), ""]
    stems = _file_stems(dict.fromkeys(r["model"] for r in records))
    plots: set[Path] = set()

    def written(path: Path) -> Path:
        plots.add(path)
        return path

    for model, safe in stems.items():
        mine = [r for r in records if r["model"] == model]
        if "T" in varying:
            sections += [f"## {model}: by T (SNN top-1 %, agreement with the ANN %, energy ratio at t = T)", "",
                         by_T_table(mine, [k for k in varying if k != "T"]), ""]
        ratios = threshold_ratios(mine, [k for k in varying if k != "policy"])
        if ratios:
            sections += [f"## {model}: thresholds relative to opt (lam / lam_opt over sites: median [min, max])",
                         "", ratios, ""]
        runs = {_label(r, varying): r["result"] for r in longest_of_each_run(mine, grid_keys)}
        sections += [f"## {model}: accuracy and energy at every t", "", curves_table(runs), ""]
        if "T" in varying:  # accuracy and energy at t = T of each conversion, vs T
            plot_curves(_by_T(mine, [k for k in varying if k != "T"]), written(out / f"by-T-{safe}.png"),
                        title=f"{model}: accuracy and energy at t = T", xlabel="T (time steps of the conversion)")
        plot_curves(runs, written(out / f"curves-{safe}.png"), title=f"{model}: every t of every run")
        counted = [r for r in mine if r["result"]["energy_ratio"] is not None]  # (None: module-swapped)
        if counted:
            plot_tradeoff([{"label": _label(r, [k for k in varying if k != "T"]),
                            "accuracy": r["result"]["snn_accuracy"][-1], "energy_ratio": r["result"]["energy_ratio"][-1]}
                           for r in counted], written(out / f"tradeoff-{safe}.png"),
                          title=f"{model}: accuracy vs energy at t = T")
    atomic_write_text(out / "table.md", "\n".join(sections))
    for stale in {p for pattern in PLOTS for p in out.glob(pattern)} - plots:
        stale.unlink(missing_ok=True)
