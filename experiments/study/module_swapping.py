"""What module swapping (models torch.fx cannot trace) costs against the traced graph.

    python experiments/study/module_swapping.py [--model runs/resnet18_small.pt] [--images 2000] [--T 1 2 4 8 16]

The trained ResNet18-small is converted two ways (n = 4, opt, identity = none; calibration on the
first 1,024 training images, evaluation on the first --images test images):
- traced: the model as it is (fx traces it);
- swapped: wrapped in a forward that branches on the data, so fx cannot trace it and convert falls
  back to module swapping: each call of a ReLU module gets a site (torchvision's BasicBlock calls
  ``self.relu`` before and after its residual add) and the stem's max pooling moves before its
  neuron, as in the traced graph.
Prints the sites and the top-1 at t = T of each conversion. docs/results.md quotes it.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import hmtconv
from hmtconv.data import get_datasets
from hmtconv.models import load_model

CALIBRATION, BATCH = 1024, 256


class BranchesOnData(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        if x.sum() > -1e30:  # data-dependent control flow: fx cannot trace it
            return self.model(x)
        return -self.model(x)


def batches(dataset, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for start in range(0, count, BATCH):
        items = [dataset[i] for i in range(start, min(count, start + BATCH))]
        out.append((torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/resnet18_small.pt")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args()
    train, test, info = get_datasets("mnist")
    model = load_model(args.model, in_channels=info.channels, image_size=info.image_size,
                       num_classes=info.num_classes).model.eval()
    calib, evals = batches(train, CALIBRATION), batches(test, args.images)
    conversions = {"traced": hmtconv.prepare(model, histogram=None),
                   "swapped": hmtconv.prepare(BranchesOnData(model).eval(), histogram=None,
                                              example_inputs=calib[0][0])}
    print(f"| conversion | sites | {' | '.join(f'T = {T}' for T in args.T)} |")
    print(f"|---|---|{'---|' * len(args.T)}")
    ann = None
    for name, prepared in conversions.items():
        hmtconv.calibrate(prepared, calib)
        accuracy = []
        for T in args.T:
            result = hmtconv.evaluate(hmtconv.convert(prepared, n=4, T=T, policy="opt"), evals,
                                      ann=model if ann is None else None)
            ann = result.ann_accuracy if ann is None else ann
            accuracy.append(f"{result.snn_accuracy[-1]:.2f}")
        sites = len(hmtconv.convert(prepared, n=4, T=1).sites())
        print(f"| {name} | {sites} | {' | '.join(accuracy)} |", flush=True)
    print(f"ANN: {ann:.2f} % on {args.images} test images")


if __name__ == "__main__":
    main()
