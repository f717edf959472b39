"""The stock torchvision ResNet18 (7x7 stride-2 stem, max pooling, residual adds) on real MNIST,
converted through the Python API at the conversion issue's checker sizes.

    python experiments/study/torchvision_resnet18.py [--epochs 1] [--images 2000]

``torchvision.models.resnet18(num_classes=10)`` with its first convolution taking one channel (the
only change), trained from seed 0 with SGD (Nesterov momentum 0.9, lr 0.05 one-cycle, weight decay
5e-4, batch 128; fit.py) on inputs normalized outside the model, then calibrated on 1,024 training
images chosen at random (seed 0) and evaluated on the first ``--images`` test images: n = 4 "opt"
at T = 1, 2, 4, 8, 16 and n = 8 "opt" at T = 1, 2, 4, each T a conversion of its own (opt's
thresholds depend on T, as the checker's do), accuracy and energy ratio at t = T, per-layer
thresholds. Prints a markdown table; docs/results.md quotes it.
"""
from __future__ import annotations

import time

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset

import hmtconv
from fit import arguments, fit
from hmtconv.data import calibration_subset, get_datasets

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class Normalized(torch.utils.data.Dataset):
    """The checker's loaders hand the model normalized images; ours are in [0, 1]."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return (x - MNIST_MEAN) / MNIST_STD, y


def build() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def train(data, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    return fit(build(), data, epochs, "sgd", lr=0.05)


def main() -> None:
    args = arguments(__doc__)
    hmtconv.keep_freed_memory()
    train_set, test_set, _ = get_datasets("mnist")
    train_set, test_set = Normalized(train_set), Normalized(test_set)
    started = time.perf_counter()
    model = train(train_set, args.epochs)
    trained = time.perf_counter() - started
    calib = DataLoader(calibration_subset(train_set, test_set, size=1024, seed=0), batch_size=256)
    test = DataLoader(Subset(test_set, range(args.images)), batch_size=256)
    prepared = hmtconv.calibrate(hmtconv.prepare(model), calib)
    print(f"torchvision resnet18, {args.epochs} epoch(s) in {trained:.0f} s; first {args.images} test images")
    print("| n | T | ANN | SNN at t = T | energy at T |")
    print("|---|---|---|---|---|")
    for n, T in ((4, 1), (4, 2), (4, 4), (4, 8), (4, 16), (8, 1), (8, 2), (8, 4)):
        snn = hmtconv.convert(prepared, n=n, T=T, policy="opt")
        r = hmtconv.evaluate(snn, test, ann=model, diagnostics=False)
        print(f"| {n} | {T} | {r.ann_accuracy:.2f} | {r.snn_accuracy[-1]:.2f} | {r.energy_ratio[-1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
