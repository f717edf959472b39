"""The training loop of the study's scripts that train a model of their own (timm_vit.py,
torchvision_resnet18.py): batch 128, shuffled, one-cycle schedule, hmtconv's optimizer recipes."""
from __future__ import annotations

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
