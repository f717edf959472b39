"""What the study's scripts that train a model of their own share (timm_vit.py,
torchvision_resnet18.py): their options, and the training loop (batch 128, shuffled, one-cycle
schedule, hmtconv's optimizer recipes)."""
from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader

from hmtconv.train import OPTIMIZERS


def fit(model: nn.Module, data, epochs: int, optimizer: str, lr: float | None = None) -> nn.Module:
    """Train ``model`` on ``data`` with ``hmtconv.train.OPTIMIZERS[optimizer]`` (its weight decay,
    its peak lr unless ``lr`` is given); returns it in eval mode."""
    recipe = OPTIMIZERS[optimizer]
    lr = recipe.lr if lr is None else lr
    loader = DataLoader(data, batch_size=128, shuffle=True)
    opt = recipe.build(model.parameters(), lr, recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return model.eval()


def arguments(doc: str) -> argparse.Namespace:
    """``--epochs`` (default 1) and ``--images`` (test images, default 2,000); ``doc``: the script's docstring."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--images", type=int, default=2000)
    return parser.parse_args()
