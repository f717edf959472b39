"""``hmtconv convert``: calibrate once and write the converted SNN (no pickle) for `evaluate --snn`."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import distributed
from ..conversion import convert
from ..errors import UserError
from ..report import markdown_table
from ..snn_io import save_snn
from ..device import resolve_device
from ..workload import load_workload
from .options import (add_conversion, add_model_and_data, check_outputs_apart, conversion_kwargs, data_options,
                      ensure_writable)
from .registry import register_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_and_data(parser, evaluates=False)  # (it evaluates nothing)
    add_conversion(parser)
    parser.add_argument("--out", type=Path, required=True, help="SNN file to write (.safetensors)")


@register_command("convert", help="Calibrate a model and write the converted SNN (thresholds and weights) to a "
                  "file that `evaluate --snn` reloads without re-calibrating.", add_arguments=add_arguments)
def run(args: argparse.Namespace) -> None:
    if args.model is None:
        raise UserError("--model is required")
    device = str(resolve_device(args.device))
    distributed.init_from_env(device)
    if distributed.is_main():
        check_outputs_apart({"--out": args.out}, {"--model": args.model, "--weights": args.weights, "--code": args.code})
        ensure_writable(args.out)  # fail now, not after calibrating
    torch.manual_seed(args.seed)
    work = load_workload(args.model, data_options(args), weights=args.weights, device=device,
                         allow_pickle=not args.no_pickle)
    snn = convert(work.model, work.calib_loader, **conversion_kwargs(args))
    if not distributed.is_main():
        return
    path = save_snn(snn, args.out, model=args.model, weights=args.weights, num_classes=work.info.num_classes,
                    extra={"dataset": args.dataset, "calib_size": work.calib_images, "calib_split": args.calib_split,
                           "code": [str(Path(p).resolve()) for p in args.code]})  # (evaluate --snn imports them)
    sites = snn.sites()
    rows = [[name, "y = x" if site.signed else "ReLU",
             f"{site.neuron.lam.item():.4g}" if site.neuron.lam.numel() == 1
             else f"{site.neuron.lam.numel()} channels, {site.neuron.lam.min().item():.3g}..{site.neuron.lam.max().item():.3g}"]
            for name, site in sites.items()]
    print(f"{len(sites)} spiking sites, thresholds from {work.calib_images} {args.calib_split} images")
    print(markdown_table(["site", "replaces", "lam (lambda_min)"], rows))
    print(f"wrote {path}")
