"""End to end against other converters: one trained MNIST CNN converted by SpikingJelly's
``ann2snn``, by sinabs' ``from_model`` and by hmtconv; accuracy and time.

    .venv/bin/python benchmarks/converters.py [--model runs/vgg_small.pt] [--limit 2000]
        [--calib-size 1024] [--batch 100] [--repeats 1] [--threads N]

Every converter calibrates on the same --calib-size MNIST training images (a random subset, seed 0,
as the CLI draws it) and is evaluated
on the same first --limit test images, held in memory as batches (data loading is not timed), each
image given as is (analog) at every step. Accuracy at t uses the mean output of steps 1..t of one
32-step run (T-independent thresholds); H-MT "opt" depends on T, so it is converted once per T and
reported at t = T. Time: the 32-step runs over the test images per sample, median of --repeats
after a warm-up on one batch, all converters side by side in this process (each repeat runs every
one in turn). A competitor that is not installed is skipped (see benchmarks/requirements.txt).

What each side counts:
- SpikingJelly 2.0.0: ``ann2snn.Converter`` (= FXConverter) with ``RateCodingRecipe(calib, mode)``,
  as in its examples/cnn_mnist.py. It gets the model with the input normalization written as the
  same 1x1 convolution (the recipe rejects ``(x - mean) / std``). It fuses conv and BN and replaces
  every ReLU by scale -> IFNode (soft reset, threshold 1) -> scale, the threshold being a running
  average (momentum 0.1) over calibration batches of each batch's 99.9th percentile or maximum.
  Max pooling stays after the neurons, on spikes. Single-step: the whole network, first conv
  included, runs every step; the loop here sums the outputs and counts correct predictions at
  every t, nothing else.
- sinabs 3.1.3: as its tutorials do it. The model as one flat ``nn.Sequential`` with each BN fused
  into its conv (``normalize_weights`` walks the top-level children and scales the parameters
  before each ReLU, which a BN in between would undo); the input normalization stays as it is.
  ``sinabs.utils.normalize_weights`` on all calibration images at once (the 99.9th percentile or
  the maximum of each ReLU's output becomes 1), then ``from_model(spike_threshold=1,
  min_v_mem=-1, add_spiking_output=True, num_timesteps=32)``: every ReLU and the output become
  ``IAFSqueeze`` neurons (membrane from 0, subtractive reset, clipped at -1, several spikes per
  step allowed: its default ``MultiSpike``), max pooling stays after the neurons, on spikes. Its
  ``normalize_weights`` scales a layer's bias like its weights although the layer's input is
  already scaled down, which this model (biases from the fused BN) does not survive; the rows
  without "as is" correct that (see ``sinabs_normalize``). Run as its users do: the image repeated
  32 times as one (batch x 32) tensor through the whole network (each neuron loops over the
  steps), ``reset_states`` before each batch, output spikes summed over steps 1..t.
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
from torch.nn.utils.fusion import fuse_conv_bn_eval

import hmtconv
from hmtconv.models.normalize import Normalize
from hmtconv.workload import DataOptions, load_workload
from timing import timed_side_by_side

MISSING = {}  # competitor -> why its import failed; its rows are skipped
try:
    from spikingjelly.activation_based import ann2snn, functional
except ImportError as error:
    ann2snn, MISSING["SpikingJelly"] = None, error
try:
    import sinabs
    from sinabs.from_torch import from_model
    from sinabs.utils import normalize_weights
except ImportError as error:
    sinabs, MISSING["sinabs"] = None, error

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


def for_sinabs(model: nn.Module) -> nn.Sequential:
    """A copy as one flat ``nn.Sequential`` (nested Sequentials unrolled) with each BatchNorm2d
    fused into the Conv2d before it, the form ``normalize_weights`` needs."""
    def leaves(module):
        if isinstance(module, nn.Sequential):
            for child in module.children():
                yield from leaves(child)
        else:
            yield module

    layers: list[nn.Module] = []
    for module in leaves(copy.deepcopy(model).eval()):
        if isinstance(module, nn.BatchNorm2d):
            if not (layers and isinstance(layers[-1], nn.Conv2d)):
                raise ValueError("sinabs rows: a BatchNorm2d not right after a Conv2d cannot be fused")
            layers[-1] = fuse_conv_bn_eval(layers[-1], module)
        else:
            layers.append(module)
    return nn.Sequential(*layers).eval()


def sinabs_normalize(ann: nn.Sequential, images: torch.Tensor, percentile: float, as_is: bool = False):
    """``sinabs.utils.normalize_weights`` on ``ann`` (flat, see ``for_sinabs``), in place: each
    ReLU's ``percentile`` of its output over ``images`` becomes 1 by scaling the Conv2d/Linear
    before it (Rueckauer et al. 2017, as its docstring says).

    As released (``as_is``) it scales a layer's weight and bias by the same factor, measured with
    the layers before already normalized: exact for bias-free layers (its tutorials' networks),
    but a layer whose input carries a scale 1/s then needs its bias divided by s as well, else the
    bias weighs s times too much; for this model the normalized ANN falls from 99.2 % to 92.8 %
    (99.9th percentile) and 58.4 % (maximum). The fix: call it one ReLU at a time, first dividing
    that layer's bias by the scale its input carries (the product of the factors so far, read off
    the weights it rescaled), and the output layer's bias by the final scale. The normalized ANN
    then computes the original's logits divided by a positive constant (same predictions)."""
    children = list(ann.named_children())
    relus, params, weighted = [], [], None
    for name, module in children:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weighted = name
        elif isinstance(module, nn.ReLU):
            relus.append(name)
            params.append(weighted)
    if as_is:
        normalize_weights(ann, images, relus, params, percentile=percentile)
        return
    scale = 1.0
    for relu, param in zip(relus, params):
        layer = ann.get_submodule(param)
        if layer.bias is not None:
            layer.bias.data /= scale
        before = layer.weight.detach().abs().sum()
        normalize_weights(ann, images, [relu], [param], percentile=percentile)
        scale *= (before / layer.weight.detach().abs().sum()).item()
    for name, module in children[[n for n, _ in children].index(params[-1]) + 1:]:
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            module.bias.data /= scale  # the output layer (no ReLU after it)


def sinabs_convert(model: nn.Module, images: torch.Tensor, percentile: float, steps: int, as_is: bool = False):
    """(the sinabs network, the normalized ANN it was made from: its accuracy checks the normalization)."""
    ann = for_sinabs(model)
    sinabs_normalize(ann, images, percentile, as_is)
    net = from_model(ann, spike_threshold=1.0, min_v_mem=-1.0, add_spiking_output=True, num_timesteps=steps)
    return net.eval(), ann


@torch.no_grad()
def sinabs_run(net, batches, steps: int) -> list[float]:
    """Accuracy (%) at t = 1..steps: the image repeated ``steps`` times (batch-major, sinabs'
    squeezed layout), output spikes summed over steps 1..t."""
    correct, samples = torch.zeros(steps), 0
    for x, y in batches:
        net.reset_states()
        out = net(x.unsqueeze(1).expand(-1, steps, *x.shape[1:]).flatten(0, 1))
        correct += (out.unflatten(0, (len(x), steps)).cumsum(1).argmax(2) == y[:, None]).sum(0)
        samples += len(y)
    return (100 * correct / samples).tolist()


def hmtconv_run(snn, batches) -> list[float]:
    return hmtconv.evaluate(snn, batches, diagnostics=False).snn_accuracy


def whole_pass(run, batches):
    """For ``timed_side_by_side``: its warm-up call runs the first batch only (a whole extra pass
    would double the run time), every later call the whole test set."""
    first = iter([batches[:1]])
    return lambda: run(next(first, batches))


@torch.no_grad()
def accuracy(model: nn.Module, batches) -> float:
    return 100 * sum((model(x).argmax(1) == y).sum().item() for x, y in batches) / sum(len(y) for _, y in batches)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="anything hmtconv's --model accepts")
    parser.add_argument("--limit", type=int, default=2000, help="first test images to evaluate on")
    parser.add_argument("--calib-size", type=int, default=1024,
                        help="training images to calibrate on (a random subset, seed 0)")
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
    ann_acc = accuracy(model, test)

    rows = []  # [converter, neuron, threshold, {t: accuracy %} or run, seconds]; runs are timed together
    notes = [f"{name} skipped: not available ({why}); see benchmarks/requirements.txt"
             for name, why in MISSING.items()]
    for note in notes:
        print(note, flush=True)
    if ann2snn is not None:
        for mode in ("99.9%", "max"):
            recipe = ann2snn.RateCodingRecipe(dataloader=calib, mode=mode)
            net = ann2snn.Converter(recipe).convert(for_spikingjelly(model)).eval()
            rows.append(["SpikingJelly", "IF", mode, lambda b, net=net: spikingjelly_run(net, b, T_MAX), None])
    if sinabs is not None:
        images = torch.cat([x for x, _ in calib])
        for percentile, threshold, as_is in ((99.9, "99.9% (normalize_weights as is)", True),
                                             (99.9, "99.9%", False), (100, "max", False)):
            net, normalized = sinabs_convert(model, images, percentile, T_MAX, as_is)
            notes.append(f"sinabs {threshold}: the normalized ANN's accuracy {accuracy(normalized, test):.2f}%")
            rows.append(["sinabs", "IAF, multi-spike", threshold, lambda b, net=net: sinabs_run(net, b, T_MAX), None])

    prepared = hmtconv.calibrate(hmtconv.prepare(model), calib)  # one calibration serves every row
    for neuron, n, policy in (("if", 1, "999"), ("if", 1, "max"), ("hmt", 4, "999"), ("hmt", 4, "opt")):
        snn = hmtconv.convert(prepared, n=n, T=T_MAX, policy=policy, neuron=neuron)
        rows.append(["hmtconv", "IF" if neuron == "if" else f"H-MT n = {n}",
                     "opt (per T)" if policy == "opt" else policy, lambda b, snn=snn: hmtconv_run(snn, b), None])

    seconds, results = timed_side_by_side([whole_pass(row[3], test) for row in rows], args.repeats)
    for row, s, acc in zip(rows, seconds, results):
        row[3], row[4] = {t: acc[t - 1] for t in STEPS}, s
    for T in STEPS[:-1]:  # "opt" thresholds depend on T: one conversion per T, read at t = T
        rows[-1][3][T] = hmtconv_run(hmtconv.convert(prepared, n=4, T=T, policy="opt"), test)[T - 1]

    print(f"{work.source}: first {work.eval_images} test images, {args.calib_size} training images (random, "
          f"seed 0) for "
          f"calibration, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| converter | neuron | threshold | " + " | ".join(f"T={t}" for t in STEPS) + " | ms per sample (32 steps) |")
    print("|---" * (4 + len(STEPS)) + "|")
    for converter, neuron, threshold, acc, s in rows:
        print(f"| {converter} | {neuron} | {threshold} | " + " | ".join(f"{acc[t]:.2f}" for t in STEPS)
              + f" | {1000 * s / work.eval_images:.3f} |")
    print(f"ANN accuracy: {ann_acc:.2f}%")
    for note in notes:
        print(note)
    base = rows[0]
    print(f"time per sample / {base[0]} {base[1]} {base[2]}'s: "
          + ", ".join(f"{c} {nr} {th} {s / base[4]:.2f}" for c, nr, th, _, s in rows[1:]))


if __name__ == "__main__":
    main()
