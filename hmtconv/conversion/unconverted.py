"""What a module-swapped model (fallback.py) leaves wrong on spikes, found by running it.

:func:`find_unconverted` runs a calibration batch with every torch call seen (a
``TorchFunctionMode``), follows the tensors computed from the sites' outputs through them, and
names the calls outside the sites and compensable modules that take such tensors, that the SNN
gets wrong (every op there runs on each step's ``[T*B, ...]`` rows alike, so only an op linear in
its spiking inputs gives the mean of the steps), and whose results reach the model's output:

- every call that is not linear or structural (linear_ops.py: what the traced path passes as it
  is): ReLUs, clamps, max pooling, comparisons, ``torch.maximum``, sorting..., run in float on
  each step's spikes;
- products and quotients of two such tensors (``a * b``, ``a @ b`` of two neurons' outputs): the
  mean of a product of spike trains is not the product of their means; masks computed from them.

A call whose result reaches no output (a check, ``if h.max() > 0``, a logger) is not named: what
the traced path refuses, a module-swapped model may do outside its outputs. (What would mix the
steps folded into the batch dim, a reduction over it, is an error instead: swapped_batch.py.)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from . import onednn
from .compensated import COMPENSATED
from .graph import SHAPE_ONLY
from .linear_ops import STRUCTURAL_FUNCTIONS, STRUCTURAL_METHODS
from .sites import ObservedActivation

Tensor = torch.Tensor
# Linear in each operand alone: wrong only where two of its factors (all its tensor arguments, or
# those at FACTORS) come from spikes.
PRODUCTS = {torch.mul: "mul", Tensor.mul: "mul", Tensor.mul_: "mul_", torch.multiply: "multiply",
            Tensor.multiply: "multiply", torch.matmul: "matmul", Tensor.matmul: "matmul", Tensor.__rmatmul__: "matmul",
            torch.bmm: "bmm", Tensor.bmm: "bmm", torch.mm: "mm", Tensor.mm: "mm", torch.einsum: "einsum",
            F.linear: "linear", torch.addmm: "addmm", Tensor.addmm: "addmm", torch.baddbmm: "baddbmm",
            Tensor.baddbmm: "baddbmm"}
FACTORS = {F.linear: slice(0, 2), torch.addmm: slice(1, 3), Tensor.addmm: slice(1, 3), torch.baddbmm: slice(1, 3),
           Tensor.baddbmm: slice(1, 3)}  # (the others' first argument is added)
# Linear in the dividend: wrong where the divisor comes from spikes.
QUOTIENTS = {torch.div: "div", Tensor.div: "div", Tensor.div_: "div_", torch.divide: "divide",
             Tensor.divide: "divide", torch.true_divide: "true_divide", Tensor.true_divide: "true_divide"}
# Linear in the other arguments while the mask or index (the argument at this index) comes from no spikes.
MASKS = {torch.where: 0, Tensor.where: 1, Tensor.masked_fill: 1, Tensor.masked_fill_: 1, torch.gather: 2,
         Tensor.gather: 2}
LINEAR_FUNCTIONS = {*STRUCTURAL_FUNCTIONS, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                    F.conv_transpose3d, F.batch_norm, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                    F.feature_alpha_dropout, torch.positive,
                    *([torch.ops.mkldnn._linear_pointwise] if onednn.available() else [])}
# (Tensor methods by name, as fx records them; the mode sees ``x + y`` as ``add``, ``2 - x`` as ``__rsub__``)
LIKE_OTHER = {"expand_as", "view_as", "reshape_as", "type_as"}  # methods reading the other tensor's size or dtype
LINEAR_METHODS = {*STRUCTURAL_METHODS, "__getitem__", "__setitem__", "__rsub__", "double", "half", "bfloat16", "cpu",
                  "cuda", "type", "positive", "copy_"}


def _method(func) -> str | None:
    """The name of the Tensor method ``func`` is, or None."""
    name = getattr(func, "__name__", None)
    return name if name is not None and getattr(Tensor, name, None) is func else None


def _is_linear(func) -> bool:
    """Structural or linear in its tensor inputs (a property's getter: ``x.shape``, ``x.T``)."""
    return func in LINEAR_FUNCTIONS or _method(func) in LINEAR_METHODS or getattr(func, "__name__", None) == "__get__"


def storage_id(t: Tensor) -> int | None:
    """The storage ``t`` views (None: a tensor without one)."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def _tensors(value) -> list[Tensor]:
    """The tensors in a call's or a model's output (tuples, lists, dicts)."""
    return [t for t in tree_leaves(value) if isinstance(t, Tensor)]


class _Recorder(TorchFunctionMode):
    """Follows the tensors computed from the sites' outputs through every call: ``spiky`` maps such
    a tensor to the calls wrong on spikes that it was computed through, and ``written`` a storage
    written in place (through any view of it) to those of the values written there, which its
    other views (the base of a view written in place) carry too; ``stack`` names the module running."""

    def __init__(self, stack: list[str | None]):
        super().__init__()
        self.stack, self.spiky = stack, WeakIdKeyDictionary()
        self.written: dict[int, tuple[StorageWeakRef, frozenset]] = {}  # storage -> (its weak ref, calls)

    def taint(self, values) -> frozenset | None:
        """The wrong calls behind the spiking tensors in ``values`` (None: no spiking tensor)."""
        found = []
        for t in tree_leaves(values):
            if isinstance(t, Tensor):
                if t in self.spiky:
                    found.append(self.spiky[t])
                written = self._written(t)
                if written is not None:
                    found.append(written)
        return frozenset().union(*found) if found else None

    def _written(self, t: Tensor) -> frozenset | None:
        entry = self.written.get(storage_id(t)) if self.written else None
        return None if entry is None or entry[0].expired() else entry[1]  # (expired: the address reused)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        method = _method(func) or ""
        # (``x.expand_as(y)`` and the like read y's size alone)
        found = self.taint(args[0] if method in LIKE_OTHER else (args, kwargs))
        if found is None or func in SHAPE_ONLY or method in SHAPE_ONLY:
            return out  # nothing from spikes in (or only their size: ``zeros_like``)
        owner = self.stack[-1] if self.stack else None
        wrong = None if owner is None else self._wrong(func, args)
        if wrong is not None:
            found = found | {(owner, wrong)}
        outputs = _tensors(out)
        for tensor in outputs:
            self.spiky[tensor] = found
        inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor)]
        writes = method == "__setitem__" or method.endswith("_") and not method.endswith("__")
        written = [args[0]] if writes and isinstance(args[0], Tensor) else []  # (``x[i] = v`` returns None)
        written += [t for t in outputs if any(t is a for a in inputs)]  # (F.relu(x, inplace=True), out=)
        for tensor in written:
            self.spiky[tensor] = found
            key = storage_id(tensor)
            if key is not None:
                self.written[key] = (StorageWeakRef(tensor.untyped_storage()), found | (self._written(tensor) or set()))
        return out

    def _wrong(self, func, args: tuple) -> str | None:
        """What this call on spikes gets wrong (its name), or None where it is linear in them."""
        spiking = [isinstance(a, Tensor) and (a in self.spiky or self._written(a) is not None) for a in args]
        if func in PRODUCTS:
            return f"{PRODUCTS[func]} of two spike trains" if sum(spiking[FACTORS.get(func, slice(None))]) > 1 else None
        if func in QUOTIENTS:
            return f"{QUOTIENTS[func]} by a spike train" if len(args) > 1 and spiking[1] else None
        if func in MASKS:
            index = MASKS[func]
            computed = index >= len(args) or spiking[index]  # (``torch.where(x)`` alone: indices)
            return f"{getattr(func, '__name__', func)} with a mask or index computed from spikes" if computed else None
        return None if _is_linear(func) else getattr(func, "__name__", str(func))


@torch.no_grad()
def find_unconverted(model: nn.Module, x: torch.Tensor) -> tuple[list[tuple[str, str]], object]:
    """(qualified module name, op) of the calls that the SNN would get wrong on spikes and whose
    results reach the output (see the module docstring), and the model's output on ``x`` (this run
    feeds the observers)."""
    stack: list[str | None] = []
    recorder = _Recorder(stack)
    hooks = []

    def enter(owner):
        return lambda module, args: stack.append(owner)  # list.append returns None: args unchanged

    def leave(module, args, output):
        stack.pop()  # returns None, so the output is kept

    def spikes(module, args, output):  # a view: a y = x site's input itself is not its spikes
        output = output.view_as(output)
        recorder.spiky[output] = recorder.taint(args) or frozenset()  # (wrong calls before a site stay wrong after it)
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
        with recorder:
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return sorted(recorder.taint(_tensors(out)) or ()), out
