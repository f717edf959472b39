"""Tracing at a known image size, for models whose forward branches on sizes in Python.

Plain fx cannot trace ``if H % self.patch: x = F.pad(...)`` or ``for i in range(x.shape[1] // 4)``
(timm's MobileViT, Twins, NesT, MViTv2...): ``x.shape`` is a proxy there. :class:`ShapeTracer`
runs the model on an example image alongside the trace, at two batch sizes, so every node has a
value; a size that is the same at both batch sizes (channels, height, width, tokens) becomes a
plain int and the Python around it runs as usual, while a size that depends on the batch (B,
B * windows) stays symbolic, so the graph still takes any batch, T folded into it included. Only
sizes are specialized: a branch on tensor values, or on the batch size, still fails to trace
(then prepare swaps modules instead). The graph is valid at the example's image size only;
calibrate and evaluate check that.
"""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.fx import _symbolic_trace

BATCHES = (2, 3)  # two batch sizes tell batch-dependent sizes from fixed ones; 1 could hit squeeze-like special cases
SIZE_METHODS, SIZE_ATTRIBUTES = {"size", "dim"}, {"shape", "ndim"}


class _ShapedProxy(fx.Proxy):
    """A proxy whose ``.shape`` and ``len()`` go through :class:`ShapeTracer`'s specialization."""

    def __getattr__(self, k: str):
        if k in SIZE_ATTRIBUTES:
            return self.tracer.create_proxy("call_function", getattr, (self, k), {})
        return super().__getattr__(k)

    def __len__(self) -> int:
        sizes = {len(v) for v in self.tracer.values[self.node]}
        if len(sizes) != 1:
            raise fx.proxy.TraceError(f"len() of {self.node.name} depends on the batch size")
        return sizes.pop()


class ShapeTracer:
    """Mixin for an ``fx.Tracer``: traces with example values (``examples``: one per batch size)."""

    def __init__(self, example: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        one = example[:1]
        self.examples = tuple(one.expand(b, *one.shape[1:]).clone() for b in BATCHES)
        self.values: dict[fx.Node, tuple] = {}

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapedProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "placeholder":  # the images, then arguments fixed at their defaults
            first = not any(n.op == "placeholder" for n in self.values)
            self.values[node] = self.examples if first else ((node.args or (None,))[0],) * len(BATCHES)
        elif kind != "output":
            with _symbolic_trace._maybe_revert_all_patches(), torch.no_grad():  # run the modules, do not trace them
                self.values[node] = tuple(self._run(node, i) for i in range(len(BATCHES)))
        return node

    def _run(self, node: fx.Node, i: int):
        """The value of ``node`` in example run ``i`` (nodes are created in execution order)."""
        if node.op == "get_attr":
            return operator.attrgetter(node.target)(self.root)
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.values[n][i])
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return self.root.get_submodule(node.target)(*args, **kwargs)

    def create_proxy(self, kind, target, args, kwargs, *rest, **more) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        sizes = (kind == "call_method" and target in SIZE_METHODS) or (
            kind == "call_function" and target is getattr and args[1] in SIZE_ATTRIBUTES)
        return self._specialize(proxy) if sizes else proxy

    def _specialize(self, proxy: fx.Proxy):
        """A size (or tuple of sizes) as plain ints where the batch does not change it."""
        node = proxy.node
        first, *others = self.values[node]
        if isinstance(first, int):
            fixed = all(o == first for o in others)
            if fixed:
                self.graph.erase_node(node)
            return first if fixed else proxy
        sizes = tuple(s if all(o[j] == s for o in others) else proxy[j] for j, s in enumerate(first))
        if not node.users:
            self.graph.erase_node(node)
        return sizes

    def iter(self, obj: fx.Proxy):
        """``for part in x.split(...)`` and the like: as many items as the example has."""
        lengths = {len(v) for v in self.values.get(obj.node, ())
                   if isinstance(v, (tuple, list)) or (isinstance(v, torch.Tensor) and v.dim() > 0)}
        if len(lengths) == 1:
            return iter([obj[j] for j in range(lengths.pop())])
        return super().iter(obj)
