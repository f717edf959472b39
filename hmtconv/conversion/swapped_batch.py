"""The batch dim of a module-swapped SNN (a model fx cannot trace, fallback.py).

Such an SNN runs the model's own forward on ``[T*B, ...]``: its neurons and compensated ops unfold
dim 0 into ``[T, B, ...]`` wherever they are called, and the SNN its output. With no graph to say
where the batch is, :func:`check_module_swapped` runs the model in ANN mode at two batch sizes and
reads it from the shapes: every input of those modules must hold the batch in dim 0 alone, one
row per sample (tokens first, or a concatenation along the batch, would mix its steps with tokens
or other samples). A compensated op may also take tensors without a batch (a LayerNorm of a
position embedding: a function of the weights, the same at every step), which it then passes
through unchanged, or runs plainly when it sees nothing else. Samples must not interact (a mean
over the batch would average the steps). Each violation is a clear error naming the module.
"""
from __future__ import annotations

import torch
from torch import nn

from ..device import placement
from .compensated import Compensated
from .multistep import TimeAware
from .sites import SpikingActivation

BATCHES = (3, 2)


def _record(net: nn.Module, x: torch.Tensor) -> tuple[dict[tuple[str, int], list], torch.Tensor]:
    """Shapes of the positional args (None: not a tensor) of every call of a site or compensated op,
    by (qualified name, call number), and the output, in ANN mode (one step, neurons as ReLU/identity)."""
    calls: dict[tuple[str, int], list] = {}
    count: dict[str, int] = {}

    def hook(name: str):
        def record(module, args):
            count[name] = count.get(name, 0) + 1
            calls[name, count[name]] = [a.shape if isinstance(a, torch.Tensor) else None for a in args]
        return record

    watched = [(name, m) for name, m in net.named_modules() if isinstance(m, (SpikingActivation, Compensated))]
    hooks = [m.register_forward_pre_hook(hook(name)) for name, m in watched]
    try:
        return calls, net(x)
    finally:
        for h in hooks:
            h.remove()


def _rows(shapes: dict[int, torch.Size | None]) -> bool | None:
    """True: the batch in dim 0 alone, one row per sample; False: no batch; None: anything else."""
    big, small = (shapes[b] for b in BATCHES)
    if big is None or small is None or len(big) != len(small):
        return None
    changed = [d for d, (u, v) in enumerate(zip(big, small)) if u != v]
    if not changed:
        return False
    return True if changed == [0] and (big[0], small[0]) == BATCHES else None


def _error(where: str, what: str) -> ValueError:
    return ValueError(f"cannot convert {where}: {what}. The model does not trace (module swapping), so the SNN runs "
                      f"its forward with the time steps folded into dim 0 of every activation: keep the batch first "
                      f"and alone there (batch_first layouts, no concatenation or reduction over the batch), or "
                      f"make the model traceable by torch.fx")


@torch.no_grad()
def check_module_swapped(net: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Check the batch layout of a module-swapped SNN's network (see the module docstring); give each
    compensated op the flags of which arguments carry the batch, or unwrap it where none does."""
    device, dtype = placement(net)
    x = torch.randn((BATCHES[0], *input_shape), generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    sites = [m for m in net.modules() if isinstance(m, SpikingActivation)]
    for m in net.modules():
        if isinstance(m, TimeAware):
            m.steps = 1
    for site in sites:
        site.ann_mode = True
    try:
        runs = {b: _record(net, x[:b]) for b in BATCHES}
    finally:
        for site in sites:
            site.ann_mode = False
    flags: dict[str, set[tuple]] = {}
    # in the order the model ran them (a set of the keys would iterate in an order that changes
    # with each process's string hashing, and so would the first violation named)
    for key in [key for key in runs[BATCHES[0]][0] if key in runs[BATCHES[1]][0]]:
        name, call = key
        arg_shapes = zip(*(runs[b][0][key] for b in BATCHES))
        rows = tuple(_rows(dict(zip(BATCHES, pair))) if pair[0] is not None else False for pair in arg_shapes)
        module = net.get_submodule(name)
        if None in rows or (isinstance(module, SpikingActivation) and rows != (True,)):
            shapes = [runs[b][0][key] for b in BATCHES]
            raise _error(f"{name} ({type(module).__name__}, call {call})",
                         f"its inputs' shapes {shapes[0]} at batch {BATCHES[0]} and {shapes[1]} at batch {BATCHES[1]} "
                         f"do not hold the batch in dim 0 alone")
        flags.setdefault(name, set()).add(rows)
    outputs = {b: runs[b][1] for b in BATCHES}
    if not isinstance(outputs[BATCHES[0]], torch.Tensor) or _rows({b: outputs[b].shape for b in BATCHES}) is not True:
        raise _error("the model's output", "it does not hold the batch in dim 0 alone")
    big, small = outputs[BATCHES[0]][:BATCHES[1]], outputs[BATCHES[1]]
    if torch.isfinite(big).all() and not torch.allclose(big, small, rtol=1e-4, atol=1e-5 * big.abs().max().item()):
        raise _error("the model", "a sample's output depends on the other samples of its batch (a reduction over the "
                     "batch dim?)")
    for name, seen in flags.items():
        module = net.get_submodule(name)
        if not isinstance(module, Compensated):
            continue
        if len(seen) > 1:
            raise _error(f"{name} ({type(module.module).__name__})", "it is called both on activations and on "
                         "tensors without a batch dim (use one module for each)")
        rows = seen.pop()
        if any(rows):
            module.temporal = rows
        else:  # a function of the weights alone: the same at every step
            net.set_submodule(name, module.module)
