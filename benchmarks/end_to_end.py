"""End-to-end simulation cost: ``evaluate`` time per batch over T x (ANN forward time per batch).

    .venv/bin/python benchmarks/end_to_end.py [--models vgg_small resnet18_small vgg16_bn resnet18]
        [--T 4 16] [--n 4 8] [--batch 32] [--repeats 3] [--keep-memory]

A dense simulation of T steps costs at least about T ANN forward passes, so the ratio is the
overhead of simulating spikes (1.0 = as fast as running the ANN T times; below 1.0 is possible
because the layers before the first spiking neuron run once). Built-in models at MNIST size,
torchvision models at 64 x 64 (random weights: speed does not depend on them). Both timings are
measured side by side in this process (ANN and SNN calls alternate, so the ANN is timed again
for every row), median of repeats after a warm-up; diagnostics off. The SNN pools with
:class:`~hmtconv.conversion.pooling.SlicedMaxPool2d` (same values as ``nn.MaxPool2d``, several
times faster on CPU) and computes its Linear layers by oneDNN (:mod:`hmtconv.conversion.onednn`,
2-2.5x faster than MKL's sgemm on this AMD CPU); the column "ANN with our layers" divides by an
ANN given the same max pooling and Linear layers, so those gains are shown apart. "ANN on T*B rows" is the ANN run once on a batch of T*B
images, over T x (ANN forward): what the T*B-row activations alone cost (bigger matmuls gain,
activations that outgrow the caches lose), before any neuron. "per-step values" is ``evaluate``
inside ``snn.per_step_values()`` over ``evaluate`` as it runs: what exchanging running means
between neurons and compensated ops saves (1.00 where none sit side by side, as in the CNNs).
"""
from __future__ import annotations

import argparse
import copy

import torch
import torchvision

import hmtconv
from hmtconv.conversion.api import swap_faster_layers
from hmtconv.conversion.attention import decompose_attention
from hmtconv.models import create_model, list_models
from timing import timed_side_by_side


def identity_for(name: str) -> str:
    """A ViT has no ReLU: signed neurons before its layers (the paper's ViT recipe)."""
    return "all" if "vit" in name else "none"


def with_our_layers(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with the SNN's faster layers (same values): max pooling by slices, Linear
    layers by oneDNN, ``nn.MultiheadAttention`` split into such Linear layers and the attention
    matmul kernel (its fused path would keep its projections on MKL)."""
    ours = copy.deepcopy(model)
    decompose_attention(ours)
    swap_faster_layers(ours)
    return ours


def build(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if name in list_models():
        return create_model(name, in_channels=1, image_size=28, num_classes=10).eval(), (1, 28, 28)
    return torchvision.models.get_model(name, num_classes=10).eval(), (3, 64, 64)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg_small", "resnet18_small", "vgg16_bn", "resnet18"])
    parser.add_argument("--T", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--keep-memory", action="store_true",
                        help="hmtconv.keep_freed_memory() first, as the CLI does (ANN and SNN both gain)")
    args = parser.parse_args()
    if args.keep_memory:
        hmtconv.keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats}; "
          f"ratio = evaluate time / (T x ANN forward time)")
    print("| model | input | n | T | ANN forward ms | evaluate ms | ratio | ratio, ANN with our layers "
          "| ANN on T*B rows | per-step values |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model, shape = build(name)
        x = torch.rand(args.batch, *shape)
        y = torch.randint(0, 10, (args.batch,))
        identity = identity_for(name)
        prepared = hmtconv.calibrate(hmtconv.prepare(model, identity=identity), [(x, y)])
        ours = with_our_layers(model)
        for n in args.n:
            for T in args.T:
                snn = hmtconv.convert(prepared, n=n, T=T, policy="999", identity=identity)
                rows = x.repeat(T, *[1] * (x.dim() - 1))
                def per_step():
                    with snn.per_step_values():
                        return hmtconv.evaluate(snn, [(x, y)], diagnostics=False)
                with torch.no_grad():
                    (t_ann, t_ours, t_rows, t_snn, t_steps), _ = timed_side_by_side(
                        [lambda: model(x), lambda: ours(x), lambda: model(rows),
                         lambda: hmtconv.evaluate(snn, [(x, y)], diagnostics=False), per_step], args.repeats)
                print(f"| {name} | {'x'.join(map(str, shape))} | {n} | {T} | {1000 * t_ann:.1f} | "
                      f"{1000 * t_snn:.1f} | {t_snn / (T * t_ann):.2f} | {t_snn / (T * t_ours):.2f} | "
                      f"{t_rows / (T * t_ann):.2f} | {t_steps / t_snn:.2f} |", flush=True)


if __name__ == "__main__":
    main()
