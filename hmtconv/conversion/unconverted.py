"""What a module-swapped model (fallback.py) leaves wrong on spikes, found by running it.

:func:`find_unconverted` runs a calibration batch with every torch call seen (a
``TorchFunctionMode``) and the tensors computed from the sites' outputs followed through them,
and names the calls outside the sites and compensable modules that take such tensors and that
the SNN would get wrong, since every op there runs on each step's ``[T*B, ...]`` rows alike:

- nonlinear functions (ReLUs, clamps, max pooling...: what the traced path makes a neuron or a
  compensated module of), which run in float on each step's spikes;
- products and quotients of two such tensors (``a * b``, ``a @ b`` of two neurons' outputs): the
  mean of a product of spike trains is not the product of their means.

(What would mix the steps folded into the batch dim, a reduction over it, is an error instead:
swapped_batch.py.)
"""
from __future__ import annotations

import operator

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from .compensated import COMPENSATED
from .functional import FUNCTIONAL, IN_PLACE_FUNCTIONS
from .sites import ObservedActivation

LINEAR_CALLS = (F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                F.conv_transpose3d)
Tensor = torch.Tensor
# Linear in each operand alone: wrong only where two operands come from spikes.
PRODUCTS = {torch.mul: "mul", Tensor.mul: "mul", Tensor.mul_: "mul_", Tensor.__mul__: "mul", Tensor.__rmul__: "mul",
            Tensor.__imul__: "mul", torch.matmul: "matmul", Tensor.matmul: "matmul", Tensor.__matmul__: "matmul",
            Tensor.__rmatmul__: "matmul", torch.bmm: "bmm", Tensor.bmm: "bmm", torch.einsum: "einsum"}
# Linear in the dividend: wrong where the divisor comes from spikes.
QUOTIENTS = {torch.div: "div", Tensor.div: "div", Tensor.div_: "div_", Tensor.__truediv__: "div",
             Tensor.__itruediv__: "div"}


def _watched() -> dict:
    """The nonlinear calls to report (as a TorchFunctionMode sees them) and their names: ReLUs,
    attention, and every other call graph.normalize makes a neuron or a compensated module of
    (max pooling, clamps, F.hardtanh...), methods by name, in place too; products apart."""
    watched = {torch.relu_: "relu_", torch.Tensor.relu_: "relu_",
               F.scaled_dot_product_attention: "scaled_dot_product_attention"}
    for call in (*FUNCTIONAL, *IN_PLACE_FUNCTIONS, F.relu, torch.relu, "relu"):
        if isinstance(call, str):  # a method, and its in-place form
            funcs = [getattr(torch.Tensor, name) for name in (call, call + "_") if hasattr(torch.Tensor, name)]
        else:
            funcs = [] if call in LINEAR_CALLS or call is operator.matmul else [call]
        for func in funcs:
            if func not in PRODUCTS:
                watched.setdefault(func, func.__name__)
    return watched


WATCHED = _watched()


class _Recorder(TorchFunctionMode):
    """Follows the tensors computed from the sites' outputs (``spiky``) through every call, and
    adds to ``found`` the calls outside handled modules that the SNN gets wrong on them."""

    def __init__(self, stack: list[str | None], spiky: WeakIdKeyDictionary, found: set[tuple[str, str]]):
        super().__init__()
        self.stack, self.spiky, self.found = stack, spiky, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(isinstance(a, torch.Tensor) and a in self.spiky for a in tree_leaves((args, kwargs))):
            return out
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.spiky[tensor] = True
        owner = self.stack[-1] if self.stack else None
        if owner is None:
            return out
        name = WATCHED.get(func) or PRODUCTS.get(func) or QUOTIENTS.get(func)
        if func in PRODUCTS and sum(isinstance(a, torch.Tensor) and a in self.spiky for a in tree_leaves(args)) > 1:
            self.found.add((owner, f"{name} of two spike trains"))
        elif func in QUOTIENTS and len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1] in self.spiky:
            self.found.add((owner, f"{name} by a spike train"))
        elif func in WATCHED and not (isinstance(out, torch.Tensor) and out.dim() == 0):
            self.found.add((owner, name))  # (a 0-d result is a number for Python, ``if h.max() > 0``)
        return out


@torch.no_grad()
def find_unconverted(model: nn.Module, x: torch.Tensor) -> tuple[list[tuple[str, str]], object]:
    """(qualified module name, op) of the calls that the SNN would get wrong on spikes (see the
    module docstring), and the model's output on ``x`` (this run feeds the observers)."""
    stack: list[str | None] = []
    spiky = WeakIdKeyDictionary()
    found: set[tuple[str, str]] = set()
    hooks = []

    def enter(owner):
        return lambda module, args: stack.append(owner)  # list.append returns None: args unchanged

    def leave(module, args, output):
        stack.pop()  # returns None, so the output is kept

    def spikes(module, args, output):  # a view: a y = x site's input itself is not its spikes
        output = output.view_as(output)
        spiky[output] = True
        return output

    handled: list[str] = []  # the types convert wraps (exact: a subclass may compute otherwise), and the sites
    for name, module in model.named_modules():
        if any(name.startswith(f"{h}.") for h in handled):
            continue  # inside one: a site's observer's amax and clamps (its tensor path) are the site's own work
        is_handled = type(module) in COMPENSATED or isinstance(module, ObservedActivation)
        if is_handled:
            handled.append(name)
        hooks.append(module.register_forward_pre_hook(enter(None if is_handled else (name or "<root>"))))
        hooks.append(module.register_forward_hook(leave))
        if isinstance(module, ObservedActivation):
            hooks.append(module.register_forward_hook(spikes))
    try:
        with _Recorder(stack, spiky, found):
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return sorted(found), out
