"""``hmtconv evaluate``: convert (or load a converted SNN) and report accuracy, energy and per-layer error."""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import distributed
from ..conversion import SNN, convert, evaluate
from ..errors import UserError
from ..models.loading import builds_random_weights
from ..models.user_code import import_code
from ..report import (atomic_write_json, curves_table, jsonable, layers_table, plot_curves, plot_layers,
                      provenance)
from ..report.plots import plot_format
from ..device import resolve_device
from ..workload import load_workload
from .options import (FIXED_BY_SNN, add_conversion, add_model_and_data, changed_conversion_options, check_outputs_apart,
                      conversion_kwargs, data_options, ensure_writable, memory_size, positive_int)
from .registry import register_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser)
    add_conversion(parser)
    sim = parser.add_argument_group("memory (results do not depend on these)")
    chunks = sim.add_mutually_exclusive_group()
    chunks.add_argument("--max-batch", type=positive_int("--max-batch"), default=None,
                        help="simulate each batch in chunks of at most this many samples (default: 32-64 on "
                        "CPU, by T, which keeps a step in cache; whole batches on GPU)")
    chunks.add_argument("--memory-budget", type=memory_size, default=None,
                        help="pick the chunk so the estimated activation memory stays under this, e.g. 4GB")
    out = parser.add_argument_group("output")
    out.add_argument("--snn", default=None, help="evaluate an SNN saved by `hmtconv convert` (no re-calibration; "
                     "--n/--T/--policy... come from the file, --T may shorten or extend the run)")
    out.add_argument("--json", type=Path, default=None, help="write the full result (with provenance) here")
    out.add_argument("--plot", type=Path, default=None,
                     help="PNG of accuracy and energy vs t; the per-layer chart goes beside it (-layers.png)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--no-diagnostics", action="store_true",
                     help="skip the per-layer |ANN - SNN| comparison (one ANN pass per batch)")


class AnnMode(nn.Module):
    """The ANN an SNN was converted from, run from the SNN's own tensors (``SNN.ann_forward``) on a
    copy of it, so that evaluate's hooks on the SNN's sites see only the SNN's own passes."""

    def __init__(self, snn: SNN):
        super().__init__()
        self.snn = copy.deepcopy(snn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.snn.ann_forward(x)


def run_evaluation(args: argparse.Namespace) -> dict:
    """Convert and evaluate as the options say; returns the JSON record."""
    device = str(resolve_device(args.device))
    distributed.init_from_env(device)
    torch.manual_seed(args.seed)
    if distributed.is_main():  # fail now, not after a long run
        layers = None if args.plot is None else layers_plot(args.plot)
        check_outputs_apart({"--json": args.json, "--plot": args.plot, "--plot's per-layer chart": layers},
                            {"--model": args.model, "--weights": args.weights, "--snn": args.snn, "--code": args.code})
        for path in (args.json, args.plot):
            if path is not None:
                ensure_writable(path)
        if args.plot is not None:
            plot_format(args.plot)
    if args.snn is not None:
        from ..snn_io import check_data_fits, load_snn

        import_recorded_code(args)
        snn, meta = load_snn(args.snn, model=args.model, weights=args.weights, device=device,
                             allow_pickle=not args.no_pickle)
        args.model = args.model or meta["model"]["spec"]
        args.weights = args.weights or meta["model"].get("weights")
        use_snn_config(args, snn.config.to_dict())
    elif args.model is None:
        raise UserError("--model is required (or --snn FILE from `hmtconv convert`)")
    work = load_workload(args.model, data_options(args), weights=args.weights, device=device,
                         allow_pickle=not args.no_pickle, calibration=args.snn is None)
    if args.snn is not None:
        check_data_fits(meta, args.snn, args.dataset, work.info.shape, work.info.num_classes)
    ann = work.model
    if args.snn is not None and builds_random_weights(args.model, args.weights):
        if distributed.is_main():
            print(f"hmtconv: note: {args.model} without --weights is a new random network each time it is built, "
                  f"so the ANN compared with is the one {args.snn} was converted from (its ANN mode)", file=sys.stderr)
        ann = AnnMode(snn).eval()
    start = time.perf_counter()
    if args.snn is None:
        snn = convert(work.model, work.calib_loader, **conversion_kwargs(args))
    converted = time.perf_counter()
    result = evaluate(snn, work.eval_loader, T=args.T, ann=ann,
                      diagnostics=not args.no_diagnostics, progress=not args.no_progress,
                      max_batch=args.max_batch, memory_budget=args.memory_budget)
    finished = time.perf_counter()
    record = result.to_dict()
    record.update(model=work.source, dataset=args.dataset, images=work.eval_images,
                  seconds={"convert": converted - start, "evaluate": finished - converted,
                           "ann_forward": result.seconds["ann"], "simulation": result.seconds["snn"],
                           "diagnostics": result.seconds["diagnostics"]},
                  provenance=provenance(jsonable(vars(args)), seed=args.seed, device=device))
    return record


def import_recorded_code(args: argparse.Namespace) -> None:
    """The --code files `hmtconv convert` was given (its model is a whole pickled one whose classes
    they define), unless --code or --no-pickle is given here."""
    from ..snn_io import recorded_code

    recorded = recorded_code(args.snn)  # (the description alone: load_snn reads and checks the tensors)
    if not recorded or args.code or args.no_pickle:
        return
    if distributed.is_main():
        print(f"hmtconv: note: importing {', '.join(recorded)}, the --code of `hmtconv convert`", file=sys.stderr)
    try:
        import_code(recorded)
    except UserError as error:
        raise UserError(f"{args.snn} was converted with --code {' '.join(recorded)}: {error}; pass the "
                        f"files that define its model's classes with --code") from error


def use_snn_config(args: argparse.Namespace, config: dict) -> None:
    """Warn about conversion options given with --snn (the file fixes them) and put the file's
    values in ``args``, which the JSON provenance records."""
    ignored = changed_conversion_options(args)
    if ignored:
        warnings.warn(f"{', '.join(ignored)} ignored: the SNN file fixes the conversion ({config_label(config)}); "
                      f"convert again to change it")
    vars(args).update({name: config[name] for name in FIXED_BY_SNN})


def layers_plot(plot: Path) -> Path:
    """Where the per-layer chart goes, beside the --plot of the curves."""
    return plot.with_name(plot.stem + "-layers.png")


def report(record: dict, args: argparse.Namespace, label: str) -> None:
    """Print the tables and write --json / --plot (rank 0 only)."""
    if not distributed.is_main():
        return
    seconds = record["seconds"]
    counts = "" if record.get("macs") is None else (  # (None: a module-swapped model, not counted)
        f", {record['synops_cumulative'][-1]:.4g} synaptic operations (accumulates) and "
        f"{record['macs']['static'] + record['T'] * record['macs']['per_step']:.4g} MACs, against the ANN's "
        f"{record['macs']['ann']:.4g} MACs")
    print(f"{record['model']} on {record['dataset']} ({record['images']} images); per sample "
          f"{record['spikes_per_sample']:.0f} spikes{counts}")
    ratio = seconds["simulation"] / max(record["T"] * seconds["ann_forward"], 1e-9)
    extra = "" if args.no_diagnostics else \
        f"; diagnostics {seconds['diagnostics']:.2f} s more (one ANN-mode pass, off with --no-diagnostics)"
    print(f"simulation {seconds['simulation']:.2f} s = {ratio:.2f} x T ANN forward passes "
          f"(ANN {seconds['ann_forward']:.2f} s){extra}")
    print(curves_table({label: record}))
    if record["per_layer"]:
        print()
        print(layers_table(record))
    if args.json is not None:
        atomic_write_json(args.json, record)
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot_curves({label: record}, args.plot, title=f"{record['model']}: {label}")
        if record["per_layer"] and record["per_layer"][0]["mean_abs_error"] is not None:
            plot_layers(record, layers_plot(args.plot), title=label)
        print(f"wrote {args.plot}")


def config_label(config: dict) -> str:
    return (f"{config['neuron']} n={config['n']} T={config['T']} {config['policy']}"
            + ("" if config["identity"] == "none" else f" identity={config['identity']}")
            + ("" if config["communicate"] else " no-comm")
            + ("" if config["granularity"] == "layer" else " per-channel"))


@register_command("evaluate", help="Convert a model (or load a converted SNN) and report ANN vs SNN accuracy at "
                  "every step, energy ratio, spikes and per-layer conversion error.", add_arguments=add_arguments)
def run(args: argparse.Namespace) -> None:
    record = run_evaluation(args)
    report(record, args, config_label(record["config"]))
