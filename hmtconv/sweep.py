"""``hmtconv sweep``: a grid of conversions, one calibration per model, resumable, with tables and plots.

Each finished point is appended to ``OUT/results.jsonl`` at once, so an interrupted or failed sweep
keeps (and reports) every finished point and a re-run skips them. Thresholds of any n, T, policy, neuron and
granularity come from one calibration of the model (per ``identity`` value, which changes
which sites are observed). Accuracy at every t <= T comes from the same run of T steps.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import sys
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .conversion import calibrate, convert, evaluate, prepare
from .conversion.memory import parse_bytes
from .conversion.policies import POLICIES, depends_on_T, histograms_for
from .conversion.snn import ConversionConfig
from .data.loaders import CALIB_SPLITS
from .errors import UserError
from .report import append_jsonl, provenance, read_jsonl, write_reports
from .workload import SEEDS, DataOptions, load_workload

GRID_KEYS = ("n", "T", "policy", "neuron", "identity", "communicate", "granularity")
_NONE = type(None)
TYPES = {  # what each config value may be (grid keys: each value of the list)
    "grid": {"n": int, "T": int, "policy": (str, int, float), "neuron": str, "identity": str, "communicate": bool,
             "granularity": str},
    "data": {"dataset": str, "data_root": (str, _NONE), "calib_size": int, "calib_split": str, "limit": (int, _NONE),
             "batch_size": int, "seed": int, "workers": (int, _NONE)},
    "[[models]]": {"model": str, "name": str, "weights": (str, _NONE)},  # model first: a name left out is the model
    "top": {"device": str, "out": str, "diagnostics": bool, "memory_budget": (str, _NONE)},
}
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", _NONE: "absent"}


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

    @property
    def results_path(self) -> Path:
        """``OUT/results.jsonl``: one record per finished point, appended as each finishes."""
        return Path(self.out) / "results.jsonl"

    def __post_init__(self):
        for key in GRID_KEYS:
            if not getattr(self, key):
                raise UserError(f"[grid] {key} is empty; give at least one value or leave it out for the default")
            for value in getattr(self, key):
                _check_type(f"[grid] {key}", value, TYPES["grid"][key])
                _check_conversion_value(key, value)
        for key, value in asdict(self.data).items():
            _check_type(f"[data] {key}", value, TYPES["data"][key])
            if key in ("calib_size", "limit", "batch_size") and value is not None and value < 1:
                raise UserError(f"[data] {key} = {value} must be at least 1")
        if self.data.workers is not None and self.data.workers < 0:
            raise UserError(f"[data] workers = {self.data.workers} must be at least 0 (0: load in the main process)")
        if self.data.seed not in SEEDS:  # (as --seed)
            raise UserError(f"[data] seed = {self.data.seed} must be in 0..{SEEDS[-1]}")
        if self.data.calib_split not in CALIB_SPLITS:  # (else found only once the first model has loaded)
            raise UserError(f"[data] calib_split = {json.dumps(self.data.calib_split)} must be one of "
                            f"{', '.join(CALIB_SPLITS)}")
        for entry in self.models:
            for key, types in TYPES["[[models]]"].items():
                _check_type(f"[[models]] {key}", getattr(entry, key), types)
        for key in TYPES["top"]:
            _check_type(key, getattr(self, key), TYPES["top"][key])
        if self.memory_budget is not None:
            try:
                parse_bytes(self.memory_budget)
            except ValueError as error:
                raise UserError(f"memory_budget: {error}") from None
        names = [entry.name for entry in self.models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise UserError(f"two [[models]] are named {duplicates[0]!r}; give each a different name")

    def points(self) -> list[dict]:
        """The grid, with duplicates removed: the IF neuron has n = 1 whatever n says."""
        seen, points = set(), []
        for values in itertools.product(*(getattr(self, k) for k in GRID_KEYS)):
            point = dict(zip(GRID_KEYS, values))
            if point["neuron"] == "if":
                point["n"] = 1
            point["policy"] = _canonical(point["policy"])
            # (100 and 100.0 are one point, kept as first written: stored records' keys hold it so)
            key = json.dumps({**point, "policy": _number(point["policy"])}, sort_keys=True)
            if key not in seen:
                seen.add(key)
                points.append(point)
        return points


def _number(policy: str | float) -> str | float:
    return float(policy) if isinstance(policy, int) and not isinstance(policy, bool) else policy


def _canonical(policy: str | float) -> str | float:
    """A percentile written as a string ("99.9") as the number it is, so the grid runs it once."""
    if isinstance(policy, str) and policy not in POLICIES:
        try:
            return float(policy)
        except ValueError:
            pass
    return policy


def load_config(path: str | Path) -> SweepConfig:
    """Read a sweep TOML: ``[data]`` (DataOptions), ``[grid]`` (lists), ``[[models]]``, and top-level
    ``device``, ``out``, ``diagnostics``, ``memory_budget``. Unknown keys are errors (a typo must not
    run a wrong grid)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise UserError(f"sweep config {path} does not exist") from error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:  # (TOML is UTF-8)
        raise UserError(f"sweep config {path} is not valid TOML: {error}") from error
    allowed = {"data", "grid", "models", "device", "out", "diagnostics", "memory_budget"}
    _no_unknown(raw, allowed, str(path))
    for key, shape, kind in (("data", dict, "a [data] table"), ("grid", dict, "a [grid] table of lists"),
                             ("models", list, "[[models]] tables")):
        value = raw.get(key, shape())
        if not isinstance(value, shape) or key == "models" and not all(isinstance(entry, dict) for entry in value):
            raise UserError(f"{path}: {key} = {json.dumps(value, default=str)} must be {kind}")
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
    try:
        return SweepConfig(models=entries, data=DataOptions(**data), **grid, **top)
    except UserError as error:
        raise UserError(f"{path}: {error}") from None


def _check_type(name: str, value, types: type | tuple) -> None:
    """A UserError naming ``name``, ``value`` and the expected type unless ``value`` is one of ``types``
    (a bool is not taken for an integer, nor a string such as "false" for a bool)."""
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        expected = " or ".join(TYPE_NAMES[t] for t in types if t is not _NONE)
        raise UserError(f"{name} = {json.dumps(value, default=str)} must be {expected}")


def _check_conversion_value(key: str, value) -> None:
    """The checks convert makes (ConversionConfig; n in 1..16 as --n), before any point runs."""
    if key == "n" and not 1 <= value <= 16:
        raise UserError(f"[grid] n = {value} must be in 1..16")
    try:
        ConversionConfig(**{key: value})
    except ValueError as error:
        raise UserError(f"[grid] {key} = {json.dumps(value)}: {error}") from None


def _no_unknown(table: dict, allowed: set, where: str) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}")


def fingerprint(config: SweepConfig, entry: ModelEntry) -> str:
    """A hash of every setting besides the grid that changes a model's results: its entry and the
    contents of its model and weights files, the data options, the device and diagnostics. Left
    out: data_root (where the same data lies), workers (who loads it) and memory_budget (chunking):
    same results."""
    data = {k: v for k, v in asdict(config.data).items() if k not in ("data_root", "workers")}
    settings = {"entry": asdict(entry), "data": data,
                "device": config.device, "diagnostics": config.diagnostics,
                "images": "calibration random by seed, limit spread over class-sorted splits"}  # (were the first)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in (entry.model, entry.weights):
        if name is not None and Path(name).is_file():
            with open(name, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


def point_key(model: str, point: dict, settings: str) -> str:
    """A record's resume key: the model's name, the grid point and the ``fingerprint`` of the rest."""
    return json.dumps({"model": model, **point, "fingerprint": settings}, sort_keys=True)


def simulations(points: list[dict]) -> list[tuple[int, list[dict]]]:
    """``(steps to simulate, grid points that run answers)``. Thresholds of T-independent policies
    (999, max, percentiles) are the same for every T and the simulation is causal, so one run of the
    largest T answers every smaller T of the same setting (its first t steps); T-dependent policies
    (eq. 24 has N = T) need a conversion per T."""
    groups: dict[str, list[dict]] = {}
    for p in points:
        shared = not depends_on_T(p["policy"])
        groups.setdefault(json.dumps({k: v for k, v in p.items() if k != "T" or not shared}, sort_keys=True),
                          []).append(p)
    return [(max(p["T"] for p in group), group) for group in groups.values()]


def run_sweep(config: SweepConfig, *, progress: bool = True) -> list[dict]:
    """Run every point not yet in ``OUT/results.jsonl`` with the same settings; return the records
    of this config's grid, in grid order (stored records of other settings or points are set aside)."""
    done = {r["key"] for r in read_jsonl(config.results_path)}
    points = config.points()
    keys = {m.name: fingerprint(config, m) for m in config.models}
    todo = [(m, p) for m in config.models for p in points if point_key(m.name, p, keys[m.name]) not in done]
    # a bar on terminals; in a log (stderr not a terminal), one line per finished simulation
    bar = tqdm(total=len(todo), desc="sweep", disable=None if progress and distributed.is_main() else True)
    try:
        run_points(config, todo, keys, bar, log=progress and distributed.is_main() and bar.disable)
    finally:  # a failed or interrupted sweep still reports its finished points
        bar.close()
        records = report_stored(config, points, keys)
    return records


def run_points(config: SweepConfig, todo: list[tuple[ModelEntry, dict]], keys: dict[str, str], bar,
               log: bool = False) -> None:
    """Run the ``todo`` points, appending each record to ``OUT/results.jsonl`` as its run finishes
    (``log``: and printing a line for it)."""
    finished = 0
    for entry in config.models:
        mine = [p for m, p in todo if m is entry]
        if not mine:
            continue
        torch.manual_seed(config.data.seed)  # a name without weights builds the same random network each run
        try:
            work = load_workload(entry.model, config.data, weights=entry.weights, device=config.device,
                                 option="model =")
        except UserError as error:
            raise UserError(f"[[models]] {entry.name!r}: {error}") from error
        for identity in sorted({p["identity"] for p in mine}):
            runs = [p for p in mine if p["identity"] == identity]
            histogram = histograms_for({p["policy"] for p in runs}, any(p["granularity"] == "channel" for p in runs))
            prepared = calibrate(prepare(work.model, identity=identity, histogram=histogram,
                                         example_inputs=work.example_inputs()), work.calib_loader)
            for steps, group in simulations(runs):
                label = f"{entry.name} " + " ".join(f"{k}={group[0][k]}" for k in GRID_KEYS if k != "T")
                bar.set_postfix_str(f"{label} T={steps}")
                snn = convert(prepared, **{**group[0], "T": steps})
                result = evaluate(snn, work.eval_loader, ann=work.model, diagnostics=config.diagnostics,
                                  memory_budget=config.memory_budget)
                for point in group:
                    part = result if point["T"] == steps else result.truncated(point["T"])
                    record = {"key": point_key(entry.name, point, keys[entry.name]), "model": entry.name, **point,
                              "simulated_T": steps, "result": part.to_dict(),
                              "provenance": provenance({"model": asdict(entry), "data": asdict(config.data), **point},
                                                       seed=config.data.seed, device=config.device)}
                    if distributed.is_main():
                        append_jsonl(config.results_path, record)
                bar.update(len(group))
                finished += len(group)
                if log:
                    print(f"sweep: {finished}/{len(todo)}: {label} T={steps}: SNN {result.snn_accuracy[-1]:.2f} %",
                          file=sys.stderr, flush=True)


def report_stored(config: SweepConfig, points: list[dict], keys: dict[str, str]) -> list[dict]:
    """The stored records of this grid, in grid order; rank 0 writes their table and plots."""
    out = Path(config.out)
    stored = {r["key"]: r for r in read_jsonl(config.results_path)}  # the last record of a key wins
    records = [stored[key] for key in (point_key(m.name, p, keys[m.name]) for m in config.models for p in points)
               if key in stored]
    if distributed.is_main():
        aside = len(stored) - len(records)
        if aside:
            print(f"set aside {aside} stored record(s) of {config.results_path} made with other settings or grid points "
                  "(kept in the file, not reported)")
        if records:
            write_reports(records, out, GRID_KEYS)
    return records
