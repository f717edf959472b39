"""torchvision's ResNet18 as the paper describes its SNN, written from the paper and the state
dict alone (test oracle: shares no code with hmtconv's graph passes).

One forward, run for the ANN and, one time step after another, for the SNN: every ReLU call is an
H-MT neuron (the Pos half alone, eqs. 13-18); the stem's max pooling runs before its neuron, as the
published code reorders conv -> bn -> relu -> maxpool (max commutes with ReLU); BatchNorm is the
affine map of its running statistics at every step; residual adds, average pooling and the head
act on each step's spikes. The image is the same analog input at every step.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from reference import basal_fire, moments


def _bn(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                        sd[f"{name}.bias"], False, 0.0, 1e-5)


def forward(sd: dict, images: torch.Tensor, site) -> torch.Tensor:
    """``site(name, x)`` at each neuron, given its input."""
    x = _bn(sd, "bn1", F.conv2d(images, sd["conv1.weight"], stride=2, padding=3))
    x = site("stem", F.max_pool2d(x, 3, 2, 1))
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            stride = 2 if layer > 1 and block == 0 else 1
            h = site(f"{p}.a", _bn(sd, f"{p}.bn1", F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1)))
            h = _bn(sd, f"{p}.bn2", F.conv2d(h, sd[f"{p}.conv2.weight"], padding=1))
            if f"{p}.downsample.0.weight" in sd:
                x = _bn(sd, f"{p}.downsample.1", F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride))
            x = site(f"{p}.b", h + x)
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


def site_moments(sd: dict, batches) -> dict[str, tuple[float, float]]:
    """Mean and population standard deviation of each neuron's input over the ANN's batches."""
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name, x):
        seen.setdefault(name, []).append(x)
        return x.relu()
    for images in batches:
        forward(sd, images, record)
    return moments(seen)


def simulate(sd: dict, images: torch.Tensor, lams: dict[str, float], n: int, T: int) -> tuple[torch.Tensor, float]:
    """The SNN's logits at each of T steps ``[T, B, classes]``, and its spikes over the T steps."""
    membranes, spikes = {}, [0.0]

    def site(name, x):
        out, membranes[name], count = basal_fire(membranes.get(name, torch.full_like(x, lams[name] / 2)), x,
                                                 lams[name], n)
        spikes[0] += count.sum().item()
        return out
    return torch.stack([forward(sd, images, site) for _ in range(T)]), spikes[0]
