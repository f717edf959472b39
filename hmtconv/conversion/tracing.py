"""The fx tracers ``prepare`` uses (graph.py edits what they return).

:class:`Tracer` is fx's, with :class:`MatMul` a leaf, decomposed attention traced through, and
item assignment recorded (``attn[:, :, 1:, 1:] = ...``, timm's MViTv2), which fx refuses.

:class:`SizedTracer` is for models whose forward branches on sizes in Python, which plain fx
cannot trace (``if H % self.patch: x = F.pad(...)``, ``range(x.shape[1] // 4)``: timm's MobileViT,
Twins, NesT...): it runs the model alongside the trace on meta tensors (shapes, no data) of the
example's image size, at two batch sizes, so every node has a shape; a size that is the same at
both batch sizes (channels, height, width, tokens) becomes a plain int and the Python around it
runs as usual, while a size that depends on the batch (B, B * windows) stays symbolic, so the
graph still takes any batch, T folded into it included. Only sizes (and the kind of device) are
specialized: a branch on tensor values, or on the batch size, still fails to trace (then prepare
swaps modules instead). The graph is valid at the example's image size only; calibrate and
evaluate check that.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import operator

import torch
from torch import fx, nn
from torch.fx import _symbolic_trace

from .attention import DecomposedAttention, MatMul
from .compensated import COMPENSATED


class NotTraceable(Exception):
    """The model has no graph these passes can edit: ``prepare`` swaps modules instead. Raised for
    any error of the model's own code under fx, and for calls :func:`graph.normalize` cannot express
    as modules (attention dropout, a LayerNorm weight computed from the input); errors of the passes
    themselves are bugs and propagate."""


class Proxy(fx.Proxy):
    """fx's proxy, plus ``x[key] = value`` as an ``operator.setitem`` node (graph.normalize makes
    it a new tensor that later readers of ``x`` read), and ``x.is_nested`` False."""

    def __setitem__(self, key, value) -> None:
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __getattr__(self, k: str):
        if k == "is_nested":  # images are plain tensors (nn.TransformerEncoder asks)
            return False
        return super().__getattr__(k)


class Tracer(fx.Tracer):
    """Default leaves (torch.nn modules) plus :class:`MatMul` and the types registered with
    ``register_compensated`` (a user's module stays one op, wrapped whole); traces through
    decomposed attention and the Transformer encoder (layers) that hold it, and through modules
    made in forward; calls a module given None alone; NumPy numbers enter as Python ones."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (DecomposedAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)):
            return False
        return isinstance(m, MatMul) or type(m) in COMPENSATED or super().is_leaf_module(m, qualname)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return Proxy(node, self)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            self.path_of_module(m)
        except NameError:
            # a module made in forward (Perceiver: ``nn.Softmax(dim=-1)(scores)``) has no name for
            # a graph node: its calls are traced instead (normalize makes modules of them)
            return forward(*args, **kwargs)
        if args and all(a is None for a in (*args, *kwargs.values())):
            # called on None alone (Perceiver's self-attention: ``nn.Identity()(None)``): called now,
            # so that ``inputs is not None`` after it is still False for Python
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def create_arg(self, a):
        if type(a).__module__ == "numpy" and getattr(a, "ndim", None) == 0:
            # a NumPy number computed from sizes (Perceiver: ``np.prod(x.shape[1:-1])``), which fx
            # cannot put in a graph: the Python number
            a = a.item()
        return super().create_arg(a)


BATCHES = (2, 3)  # two batch sizes tell batch-dependent sizes from fixed ones; 1 could hit squeeze-like special cases
SIZE_METHODS, SIZE_ATTRIBUTES = {"size", "dim"}, {"shape", "ndim"}


class _SizedProxy(Proxy):
    """A proxy whose ``.shape``, ``len()`` and ``.device.type`` go through :class:`SizedTracer`'s
    specialization."""

    def __getattr__(self, k: str):
        if k in SIZE_ATTRIBUTES or k == "device":
            return self.tracer.create_proxy("call_function", getattr, (self, k), {})
        if k == "dtype" and self.tracer.values.get(self.node) is not None:
            # for Python (Hugging Face: ``if pixel_values.dtype != weight.dtype``): the example's
            return self.tracer.values[self.node][0].dtype
        if k == "type" and self.node.target is getattr and self.node.args[1] == "device":
            # the kind of device, for Python (EfficientViT: ``torch.autocast(x.device.type, ...)``); the
            # device itself stays symbolic, so the SNN still moves to another device
            return self.tracer.device_type
        return super().__getattr__(k)

    def __len__(self) -> int:
        values = self.tracer.values[self.node]
        sizes = {len(v) for v in values} if values is not None else set()
        if len(sizes) != 1:
            raise fx.proxy.TraceError(f"len() of {self.node.name} depends on the batch size (or is unknown)")
        return sizes.pop()


class Shape(tuple):
    """A shape with no symbolic size, as :class:`SizedTracer` answers ``x.shape``: a tuple, so that
    ``(batch,) + pos.shape`` with a symbolic batch concatenates (Perceiver; ``torch.Size`` takes
    ints only), with ``torch.Size``'s ``numel()`` (VOLO) and slices that stay shapes."""

    def numel(self) -> int:
        return math.prod(self)

    def __getitem__(self, key):
        item = super().__getitem__(key)
        return Shape(item) if isinstance(key, slice) else item


class SizedTracer(Tracer):
    """:class:`Tracer` with example values (meta tensors, one per batch size) at every node."""

    def __init__(self, example: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        # on the meta device: shapes and dtypes, no data, no arithmetic, no memory for activations
        self.examples = tuple(torch.empty((b, *example.shape[1:]), dtype=example.dtype, device="meta") for b in BATCHES)
        self.device_type = example.device.type
        self.values: dict[fx.Node, tuple | None] = {}  # None: not computable on meta tensors

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SizedProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "placeholder":  # the images, then arguments fixed at their defaults
            first = not any(n.op == "placeholder" for n in self.values)
            self.values[node] = self.examples if first else ((node.args or (None,))[0],) * len(BATCHES)
        elif kind != "output":
            try:
                with _symbolic_trace._maybe_revert_all_patches():  # run the modules, do not trace them
                    self.values[node] = tuple(self._run(node, i) for i in range(len(BATCHES)))
            except Exception:  # .item(), an op without a meta kernel: sizes read from it stay symbolic
                self.values[node] = None
        return node

    def _run(self, node: fx.Node, i: int):
        """The value of ``node`` in example run ``i`` (nodes are created in execution order)."""
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(self.root)
            return value.to("meta") if isinstance(value, torch.Tensor) else value
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.values[n][i])
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        module = self.root.get_submodule(node.target)
        tensors = {name: t.to("meta") for name, t in (*module.named_parameters(), *module.named_buffers())}
        return torch.func.functional_call(module, tensors, args, kwargs)

    def create_proxy(self, kind, target, args, kwargs, *rest, **more) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        sizes = (kind == "call_method" and target in SIZE_METHODS) or (
            kind == "call_function" and target is getattr and args[1] in SIZE_ATTRIBUTES)
        return self._specialize(proxy) if sizes else proxy

    def _specialize(self, proxy: fx.Proxy):
        """A size (or tuple of sizes) as plain ints where the batch does not change it."""
        node = proxy.node
        if self.values[node] is None:
            return proxy
        first, *others = self.values[node]
        if isinstance(first, int):
            fixed = all(o == first for o in others)
            if fixed:
                self.graph.erase_node(node)
            return first if fixed else proxy
        sizes = tuple(s if all(o[j] == s for o in others) else proxy[j] for j, s in enumerate(first))
        if not node.users:
            self.graph.erase_node(node)
            return Shape(sizes) if isinstance(first, torch.Size) else type(first)(sizes)
        return sizes

    def iter(self, obj: fx.Proxy):
        """``for part in x.split(...)`` and the like: as many items as the example has."""
        lengths = {len(v) for v in self.values.get(obj.node) or ()
                   if isinstance(v, (tuple, list)) or (isinstance(v, torch.Tensor) and v.dim() > 0)}
        if len(lengths) == 1:
            return iter([obj[j] for j in range(lengths.pop())])
        return super().iter(obj)


def trace(model: nn.Module, example: torch.Tensor | None = None, sized: bool = False) -> tuple[fx.GraphModule, bool]:
    """The graph of ``model(images)`` and whether it is specialized to ``example``'s image size
    (tried where plain tracing fails, or at once with ``sized``). The SNN is called with the images
    only, so optional arguments of ``forward`` (timm's ``attn_mask=None, is_causal=False``) are
    fixed at their defaults."""
    optional = list(inspect.signature(model.forward).parameters.values())[1:]
    defaults = {p.name: p.default for p in optional if p.default is not inspect.Parameter.empty} or None
    dropped = []
    try:
        graph, sized = _trace(model, example, defaults, sized)
    except NotTraceable:
        # fx runs the hooks of the modules it traces through on proxies: one that changes a block's
        # output joins the graph, but one that reads values (a logger's out.mean().item()) fails
        # the trace. Without them, then, and each put back where the trace still succeeds.
        with _hooks_set_aside(model) as aside:
            if not aside:
                raise
            graph, sized = _trace(model, example, defaults, sized)
            for name, hooks, every in aside:
                for key, hook in every.items():
                    hooks[key] = hook  # (after those kept before it: the order stays)
                    try:
                        graph, sized = _trace(model, example, defaults, sized)
                    except NotTraceable:
                        del hooks[key]
                        dropped.append(name)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.meta[HOOKS_DROPPED] = list(dict.fromkeys(dropped))
    return gm, sized


HOOKS_DROPPED = "hmtconv_hooks_dropped"  # gm.meta: the modules a hook of which failed the trace


def _trace(model: nn.Module, example: torch.Tensor | None, defaults: dict | None,
           sized: bool) -> tuple[fx.Graph, bool]:
    try:
        if sized:
            raise NotTraceable("asked for a graph at the example's image size")
        return Tracer().trace(model, concrete_args=defaults), False
    except Exception as error:  # the model's code run on proxies may raise anything
        if example is None:
            raise NotTraceable(f"{type(error).__name__}: {error}") from error
        try:
            return SizedTracer(example).trace(model, concrete_args=defaults), True
        except Exception as sized_error:
            raise NotTraceable(f"{type(error).__name__}: {error}; at the example's image size: "
                               f"{type(sized_error).__name__}: {sized_error}") from sized_error


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks or forward pre-hooks."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


@contextlib.contextmanager
def _hooks_set_aside(model: nn.Module):
    """The hooks of the modules fx traces through, set aside for a ``with`` block (and back after
    it, in their order: module swapping, should it follow, runs them); yields ``(module name, its
    hook dict, the hooks it had)`` for each pre- and post-hook dict emptied."""
    tracer = Tracer()
    aside = [(name, hooks, dict(hooks)) for name, m in model.named_modules()
             if hooked(m) and not tracer.is_leaf_module(m, name)
             for hooks in (m._forward_pre_hooks, m._forward_hooks) if hooks]
    for _, hooks, _ in aside:
        hooks.clear()
    try:
        yield aside
    finally:
        for _, hooks, every in aside:
            hooks.clear()
            hooks.update(every)
