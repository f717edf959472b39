"""``hmtconv sweep``: a grid of conversions, one calibration per model, resumable, with tables and plots.

Each finished point is appended to ``OUT/results.jsonl`` at once, so an interrupted sweep keeps
every finished point and a re-run skips them. Thresholds of any n, T, policy, neuron and
granularity come from one calibration of the model (per ``identity`` value, which changes
which sites are observed). Accuracy at every t <= T comes from the same run of T steps.
"""
from __future__ import annotations

import itertools
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .conversion import calibrate, convert, evaluate, prepare
from .conversion.policies import T_DEPENDENT
from .errors import UserError
from .report import (append_jsonl, atomic_write_text, curves_table, markdown_table, plot_curves, plot_tradeoff,
                     provenance, read_jsonl)
from .workload import DataOptions, load_workload

GRID_KEYS = ("n", "T", "policy", "neuron", "identity", "communicate", "granularity")


@dataclass
class ModelEntry:
    name: str  # label in tables
    model: str  # anything --model accepts
    weights: str | None = None


@dataclass
class SweepConfig:
    models: list[ModelEntry]
    data: DataOptions = field(default_factory=DataOptions)
    n: list[int] = field(default_factory=lambda: [4])
    T: list[int] = field(default_factory=lambda: [4])
    policy: list = field(default_factory=lambda: ["opt"])
    neuron: list[str] = field(default_factory=lambda: ["hmt"])
    identity: list[str] = field(default_factory=lambda: ["none"])
    communicate: list[bool] = field(default_factory=lambda: [True])
    granularity: list[str] = field(default_factory=lambda: ["layer"])
    device: str = "cpu"
    out: str = "runs/sweep"
    diagnostics: bool = False  # per-layer |ANN - SNN| costs one ANN pass per batch
    memory_budget: str | None = None  # e.g. "4GB": simulate batches in chunks that fit (evaluate)

    def points(self) -> list[dict]:
        """The grid, with duplicates removed: the IF neuron has n = 1 whatever n says."""
        seen, points = set(), []
        for values in itertools.product(*(getattr(self, k) for k in GRID_KEYS)):
            point = dict(zip(GRID_KEYS, values))
            if point["neuron"] == "if":
                point["n"] = 1
            key = json.dumps(point, sort_keys=True)
            if key not in seen:
                seen.add(key)
                points.append(point)
        return points


def load_config(path: str | Path) -> SweepConfig:
    """Read a sweep TOML: ``[data]`` (DataOptions), ``[grid]`` (lists), ``[[models]]``, and top-level
    ``device``, ``out``, ``diagnostics``, ``memory_budget``. Unknown keys are errors (a typo must not
    run a wrong grid)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as error:
        raise UserError(f"sweep config {path} does not exist") from error
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"sweep config {path} is not valid TOML: {error}") from error
    allowed = {"data", "grid", "models", "device", "out", "diagnostics", "memory_budget"}
    _no_unknown(raw, allowed, str(path))
    data = raw.get("data", {})
    _no_unknown(data, {f.name for f in fields(DataOptions)}, f"{path} [data]")
    grid = raw.get("grid", {})
    _no_unknown(grid, set(GRID_KEYS), f"{path} [grid]")
    models = raw.get("models", [])
    if not models:
        raise UserError(f"{path} lists no [[models]] (each needs name and model)")
    entries = []
    for entry in models:
        _no_unknown(entry, {"name", "model", "weights"}, f"{path} [[models]]")
        if "model" not in entry:
            raise UserError(f"{path}: a [[models]] entry has no 'model'")
        entries.append(ModelEntry(entry.get("name", entry["model"]), entry["model"], entry.get("weights")))
    grid = {k: (v if isinstance(v, list) else [v]) for k, v in grid.items()}
    top = {k: raw[k] for k in ("device", "out", "diagnostics", "memory_budget") if k in raw}
    return SweepConfig(models=entries, data=DataOptions(**data), **grid, **top)


def _no_unknown(table: dict, allowed: set, where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}")


def point_key(model: str, point: dict) -> str:
    return json.dumps({"model": model, **point}, sort_keys=True)


def simulations(points: list[dict]) -> list[tuple[int, list[dict]]]:
    """``(steps to simulate, grid points that run answers)``. Thresholds of T-independent policies
    (999, max, percentiles) are the same for every T and the simulation is causal, so one run of the
    largest T answers every smaller T of the same setting (its first t steps); T-dependent policies
    (eq. 24 has N = T) need a conversion per T."""
    groups: dict[str, list[dict]] = {}
    for p in points:
        shared = p["policy"] not in T_DEPENDENT
        groups.setdefault(json.dumps({k: v for k, v in p.items() if k != "T" or not shared}, sort_keys=True),
                          []).append(p)
    return [(max(p["T"] for p in group), group) for group in groups.values()]


def run_sweep(config: SweepConfig, *, progress: bool = True) -> list[dict]:
    """Run every point not yet in ``OUT/results.jsonl``; return all records (old and new)."""
    out = Path(config.out)
    results_path = out / "results.jsonl"
    done = {r["key"] for r in read_jsonl(results_path)}
    points = config.points()
    todo = [(m, p) for m in config.models for p in points if point_key(m.name, p) not in done]
    bar = tqdm(total=len(todo), desc="sweep", disable=not progress or not distributed.is_main())
    for entry in config.models:
        mine = [p for m, p in todo if m is entry]
        if not mine:
            continue
        work = load_workload(entry.model, config.data, weights=entry.weights, device=config.device)
        for identity in sorted({p["identity"] for p in mine}):
            prepared = calibrate(prepare(work.model, identity=identity), work.calib_loader)
            for steps, group in simulations([p for p in mine if p["identity"] == identity]):
                bar.set_postfix_str(f"{entry.name} " + " ".join(f"{k}={group[0][k]}" for k in GRID_KEYS if k != "T")
                                    + f" T={steps}")
                snn = convert(prepared, **{**group[0], "T": steps})
                result = evaluate(snn, work.eval_loader, ann=work.model, diagnostics=config.diagnostics,
                                  memory_budget=config.memory_budget)
                for point in group:
                    part = result if point["T"] == steps else result.truncated(point["T"])
                    record = {"key": point_key(entry.name, point), "model": entry.name, **point,
                              "simulated_T": steps, "result": part.to_dict(),
                              "provenance": provenance({"model": asdict(entry), "data": asdict(config.data), **point},
                                                       seed=config.data.seed, device=config.device)}
                    if distributed.is_main():
                        append_jsonl(results_path, record)
                bar.update(len(group))
    bar.close()
    records = read_jsonl(results_path)
    if distributed.is_main() and records:
        write_reports(records, out)
    return records


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
        rows.append([_label(r, keys), r["policy"], f"{ratio.median().item():.3g} [{ratio.min().item():.3g}, "
                     f"{ratio.max().item():.3g}]"])
    return markdown_table(["setting", "policy", "lam / lam_opt"], rows) if rows else None


def write_reports(records: list[dict], out: Path) -> None:
    """``table.md`` (final-step accuracy and energy of every point, and full curves) and PNG plots."""
    varying = [k for k in GRID_KEYS if len({json.dumps(r[k]) for r in records}) > 1]
    header = ["model", *GRID_KEYS, "ANN %", "SNN % at T", "agreement at T", "energy at T", "spikes/sample"]
    rows = [[r["model"], *(r[k] for k in GRID_KEYS), r["result"]["ann_accuracy"], r["result"]["snn_accuracy"][-1],
             (r["result"].get("agreement") or [None])[-1],
             (r["result"]["energy_ratio"] or [None])[-1], r["result"]["spikes_per_sample"]] for r in records]
    sections = ["# Sweep results", "", markdown_table(header, rows), ""]
    for model in dict.fromkeys(r["model"] for r in records):
        mine = [r for r in records if r["model"] == model]
        if "T" in varying:
            sections += [f"## {model}: by T (SNN top-1 %, agreement with the ANN %, energy ratio at t = T)", "",
                         by_T_table(mine, [k for k in varying if k != "T"]), ""]
        ratios = threshold_ratios(mine, [k for k in varying if k != "policy"])
        if ratios:
            sections += [f"## {model}: thresholds relative to opt (lam / lam_opt over sites: median [min, max])",
                         "", ratios, ""]
        # a run answers the smaller T of T-independent policies too: show each simulation once
        runs = {_label(r, varying): r["result"] for r in mine if r.get("simulated_T", r["T"]) == r["T"]}
        sections += [f"## {model}: accuracy and energy at every t", "", curves_table(runs), ""]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
        if "T" in varying:  # accuracy and energy at t = T of each conversion, vs T
            plot_curves(_by_T(mine, [k for k in varying if k != "T"]), out / f"by-T-{safe}.png",
                        title=f"{model}: accuracy and energy at t = T", xlabel="T (time steps of the conversion)")
        plot_curves(runs, out / f"curves-{safe}.png", title=f"{model}: every t of every run")
        plot_tradeoff([{"label": _label(r, [k for k in varying if k != "T"]), "accuracy": r["result"]["snn_accuracy"][-1],
                        "energy_ratio": (r["result"]["energy_ratio"] or [0.0])[-1]} for r in mine],
                      out / f"tradeoff-{safe}.png", title=f"{model}: accuracy vs energy at t = T")
    atomic_write_text(out / "table.md", "\n".join(sections))
