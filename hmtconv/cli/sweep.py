"""``hmtconv sweep CONFIG.toml``: a resumable grid of conversions with a table and plots."""
from __future__ import annotations

import argparse

from .. import distributed
from ..sweep import load_config, run_sweep
from ..device import resolve_device
from .options import add_code_option, ensure_writable
from .registry import register_command

EXAMPLE = """example CONFIG.toml:
  out = "runs/sweep"
  [data]
  dataset = "mnist"
  limit = 2000
  [[models]]
  name = "vgg"
  model = "runs/vgg_small-mnist-s0.pt"
  [grid]
  n = [4, 8]
  T = [2, 4, 8]
  policy = ["opt", "999"]
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLE
    parser.add_argument("config", help="TOML file: [data], [grid], [[models]], out, device, diagnostics, memory_budget")
    parser.add_argument("--out", default=None, help="override the config's output directory")
    parser.add_argument("--data-root", default=None, help="override the config's [data] data_root")
    parser.add_argument("--device", default=None, help="override the config's device (cpu, cuda, cuda:1...)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_code_option(parser)


@register_command("sweep", help="Run a grid over models, n, T, policy, neuron, identity, communication and "
                  "granularity; results go to OUT/results.jsonl as each point finishes (re-running resumes), with "
                  "OUT/table.md and PNG plots.", add_arguments=add_arguments)
def run(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    if args.out is not None:
        config.out = args.out
    if args.data_root is not None:
        config.data.data_root = args.data_root
    if args.device is not None:
        config.device = args.device
    config.device = str(resolve_device(config.device, "--device" if args.device is not None
                                       else f"{args.config}: device ="))
    distributed.init_from_env(config.device)
    if distributed.is_main():
        ensure_writable(config.results_path)  # fail now, not after the first point
    records = run_sweep(config, progress=not args.no_progress)
    if distributed.is_main():
        print(f"{len(records)} points in {config.out}/results.jsonl; table in {config.out}/table.md")
