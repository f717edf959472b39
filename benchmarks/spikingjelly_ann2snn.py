"""End to end against SpikingJelly's converter: one trained MNIST CNN converted by both, accuracy and time.

    .venv/bin/python benchmarks/spikingjelly_ann2snn.py [--model runs/vgg_small.pt] [--limit 2000]
        [--calib-size 1024] [--batch 100] [--repeats 1] [--threads N]

Both sides calibrate on the same first --calib-size MNIST training images and are evaluated on the
same first --limit test images, held in memory as batches (data loading is not timed). Accuracy at
t uses the mean output of steps 1..t of one 32-step run (T-independent thresholds); H-MT "opt"
depends on T, so it is converted once per T and reported at t = T. Time: the 32-step run over the
test images per sample, median of --repeats after a warm-up on one batch, side by side in this
process.

What each side counts:
- SpikingJelly 2.0.0: ``ann2snn.Converter`` (= FXConverter) with ``RateCodingRecipe(calib, mode)``,
  as in its examples/cnn_mnist.py. It gets the model with the input normalization written as the
  same 1x1 convolution (the recipe rejects ``(x - mean) / std``). It fuses conv and BN and replaces
  every ReLU by scale -> IFNode (soft reset, threshold 1) -> scale, the threshold being a running
  average (momentum 0.1) over calibration batches of each batch's 99.9th percentile or maximum.
  Max pooling stays after the neurons, on spikes. Single-step: the whole network, first conv
  included, runs every step; the loop here sums the outputs and counts correct predictions at
  every t, nothing else.
- hmtconv: thresholds from the whole calibration set (99.9th percentile, maximum, or "opt");
  max pooling moved before the neuron (it commutes with ReLU); layers before the first neuron run
  once; ``evaluate`` also counts spikes and synaptic operations per step (diagnostics off).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

import hmtconv
from hmtconv.models.normalize import Normalize
from hmtconv.workload import DataOptions, load_workload
from timing import timed

try:
    from spikingjelly.activation_based import ann2snn, functional
except ImportError as error:
    sys.exit(f"SpikingJelly not available ({error}); see benchmarks/requirements.txt")

DEFAULT_MODEL = "runs/vgg_small.pt"
TRAIN = "hmtconv train --model vgg_small --dataset mnist --epochs 3 --seed 0 --out runs/vgg_small.pt"
STEPS = (4, 8, 16, 32)
T_MAX = STEPS[-1]


def for_spikingjelly(model: nn.Module) -> nn.Module:
    """A copy with each input normalization ``(x - mean) / std`` as the same 1x1 convolution:
    SpikingJelly's converter rejects the division (a function node its step-mode adapter lacks)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Normalize):
            conv = nn.Conv2d(len(module.std), len(module.std), 1, groups=len(module.std))
            conv.weight.data = (1 / module.std).view(-1, 1, 1, 1)
            conv.bias.data = -(module.mean / module.std).flatten()
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, conv)
    return model


@torch.no_grad()
def spikingjelly_run(net: torch.nn.Module, batches, steps: int) -> list[float]:
    """Accuracy (%) at t = 1..steps: the same image every step, outputs averaged over steps 1..t."""
    correct, samples = torch.zeros(steps), 0
    for x, y in batches:
        functional.reset_net(net)
        total = 0
        for t in range(steps):
            total = total + net(x)
            correct[t] += (total.argmax(1) == y).sum()
        samples += len(y)
    return (100 * correct / samples).tolist()


def hmtconv_run(snn, batches) -> list[float]:
    return hmtconv.evaluate(snn, batches, diagnostics=False).snn_accuracy


def whole_pass(run, batches):
    """For ``timed``: its warm-up call runs the first batch only (a whole extra pass would double
    the run time), every later call the whole test set."""
    first = iter([batches[:1]])
    return lambda: run(next(first, batches))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="anything hmtconv's --model accepts")
    parser.add_argument("--limit", type=int, default=2000, help="first test images to evaluate on")
    parser.add_argument("--calib-size", type=int, default=1024, help="first training images to calibrate on")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.model == DEFAULT_MODEL and not Path(DEFAULT_MODEL).is_file():
        print(f"{DEFAULT_MODEL} not found; make it with:\n    {TRAIN}")
        sys.exit(2)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = load_workload(args.model, DataOptions(dataset="mnist", calib_size=args.calib_size, limit=args.limit,
                                                 batch_size=args.batch))
    model, calib, test = work.model, list(work.calib_loader), list(work.eval_loader)
    with torch.no_grad():
        ann_acc = 100 * sum((model(x).argmax(1) == y).sum().item() for x, y in test) / work.eval_images

    rows = []  # (converter, neuron, threshold, {t: accuracy %}, seconds for the 32-step pass)
    for mode in ("99.9%", "max"):
        recipe = ann2snn.RateCodingRecipe(dataloader=calib, mode=mode)
        net = ann2snn.Converter(recipe).convert(for_spikingjelly(model)).eval()
        seconds, acc = timed(whole_pass(lambda b: spikingjelly_run(net, b, T_MAX), test), args.repeats)
        rows.append(("SpikingJelly", "IF", mode, {t: acc[t - 1] for t in STEPS}, seconds))

    prepared = hmtconv.calibrate(hmtconv.prepare(model), calib)  # one calibration serves every row
    for neuron, n, policy in (("if", 1, "999"), ("if", 1, "max"), ("hmt", 4, "999")):
        snn = hmtconv.convert(prepared, n=n, T=T_MAX, policy=policy, neuron=neuron)
        seconds, acc = timed(whole_pass(lambda b: hmtconv_run(snn, b), test), args.repeats)
        rows.append(("hmtconv", "IF" if neuron == "if" else f"H-MT n = {n}", policy,
                     {t: acc[t - 1] for t in STEPS}, seconds))
    opt = {}
    for T in STEPS:  # "opt" thresholds depend on T: one conversion per T, read at t = T
        snn = hmtconv.convert(prepared, n=4, T=T, policy="opt")
        if T == T_MAX:
            seconds, acc = timed(whole_pass(lambda b: hmtconv_run(snn, b), test), args.repeats)
        else:
            acc = hmtconv_run(snn, test)
        opt[T] = acc[T - 1]
    rows.append(("hmtconv", "H-MT n = 4", "opt (per T)", opt, seconds))

    print(f"{work.source}: first {work.eval_images} test images, first {args.calib_size} training images for "
          f"calibration, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| converter | neuron | threshold | " + " | ".join(f"T={t}" for t in STEPS) + " | ms per sample (32 steps) |")
    print("|---" * (4 + len(STEPS)) + "|")
    for converter, neuron, threshold, acc, seconds in rows:
        print(f"| {converter} | {neuron} | {threshold} | " + " | ".join(f"{acc[t]:.2f}" for t in STEPS)
              + f" | {1000 * seconds / work.eval_images:.3f} |")
    print(f"ANN accuracy: {ann_acc:.2f}%")
    base = rows[0][4]
    print("time per sample / SpikingJelly 99.9%'s: "
          + ", ".join(f"{c} {nr} {th} {s / base:.2f}" for c, nr, th, _, s in rows[1:]))


if __name__ == "__main__":
    main()
