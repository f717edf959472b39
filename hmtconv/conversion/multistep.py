"""Multi-step execution: time folded into the batch, and the analog prefix run once.

Activations of the SNN are ``[T*B, ...]`` (time-major: step t is rows ``t*B .. t*B+B-1``), so every
stateless op (conv, BatchNorm, pooling, add, reshape, ...) runs once on all steps in one call;
only the time-aware modules (neurons, compensated ops, :class:`ToTime`) unfold to ``[T, B, ...]``.

Nodes of the graph fall in three classes: ``const`` (parameters and buffers), ``static`` (depend on
the input image but not on any spike: identical at every step, so computed once on ``[B, ...]``)
and ``temporal``. :func:`insert_time_expansion` inserts a :class:`ToTime` wherever a static tensor
meets a temporal op. A static *size* (``x.shape[0]``) read by a temporal op would be B instead of
T*B, so that op reads it from a copy of the size computation on the time-expanded tensor (the
static ops keep theirs: ``h.view(x.size(0), -1)`` after a neuron leaves the first conv static).
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata


class TimeAware(nn.Module):
    """A module that needs the number of steps; the SNN sets ``steps`` before each run."""

    steps: int = 1


def unfold(x: torch.Tensor, steps: int) -> torch.Tensor:
    """``[T*B, ...] -> [T, B, ...]``."""
    return x.reshape(steps, x.shape[0] // steps, *x.shape[1:])


def fold(x: torch.Tensor) -> torch.Tensor:
    """``[T, B, ...] -> [T*B, ...]``."""
    return x.flatten(0, 1)


def step_index(steps: int, like: torch.Tensor) -> torch.Tensor:
    """``t = 1..T`` shaped ``[T, 1, ..., 1]`` to broadcast over ``[T, B, ...]``."""
    t = torch.arange(1, steps + 1, device=like.device, dtype=like.dtype)
    return t.view(steps, *([1] * (like.dim() - 1)))


class ToTime(TimeAware):
    """Repeat a static ``[B, ...]`` activation at every step: ``[T*B, ...]``, always a new tensor
    (an expanded view would alias its input, and a neuron may write over its input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.steps, *([1] * (x.dim() - 1)))


def is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def classify(graph: fx.Graph, starts_time) -> dict[fx.Node, str]:
    """``const`` / ``static`` / ``temporal`` for every node; ``starts_time(node)`` marks spiking nodes."""
    kind: dict[fx.Node, str] = {}
    for node in graph.nodes:
        inputs = {kind[i] for i in node.all_input_nodes}
        if node.op == "placeholder":
            kind[node] = "static"
        elif starts_time(node) or "temporal" in inputs:
            kind[node] = "temporal"
        else:
            kind[node] = "static" if "static" in inputs else "const"
    return kind


def _add_to_time(gm: fx.GraphModule, source: fx.Node) -> fx.Node:
    name = f"to_time_{source.name}"
    gm.add_submodule(name, ToTime())
    with gm.graph.inserting_after(source):
        node = gm.graph.call_module(name, (source,))
    node.meta["tensor_meta"] = source.meta.get("tensor_meta")
    return node


def insert_time_expansion(gm: fx.GraphModule, starts_time, has_batch=lambda node: True) -> dict[fx.Node, str]:
    """Insert :class:`ToTime` at every static -> temporal edge where the static tensor has a batch
    dim (``has_batch``; one made in forward from sizes and devices alone, as ``torch.arange(N,
    device=x.device)``, broadcasts over the steps as it is); returns the final classification.

    Needs ``node.meta["tensor_meta"]`` (run ``ShapeProp`` first) to tell tensors from sizes.
    """
    def is_to_time(node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(gm.get_submodule(node.target), ToTime)

    def marks_time(node: fx.Node) -> bool:
        return is_to_time(node) or starts_time(node)

    kind = classify(gm.graph, marks_time)
    shared: dict[fx.Node, fx.Node] = {}  # static tensor -> its ToTime
    copies: dict[fx.Node, fx.Node] = {}  # static size -> the same computed on time-expanded tensors

    def over_time(node: fx.Node) -> fx.Node:
        if node not in copies:
            if is_tensor(node) and not has_batch(node):  # (torch.arange(N)): the same at every step
                copies[node] = node
            elif is_tensor(node):
                if node not in shared:
                    shared[node] = _add_to_time(gm, node)
                copies[node] = shared[node]
            else:
                with gm.graph.inserting_after(node):
                    copies[node] = gm.graph.node_copy(
                        node, lambda a: over_time(a) if kind.get(a) == "static" else a)
        return copies[node]

    for node in list(gm.graph.nodes):  # sizes first
        if kind.get(node) == "temporal":
            for inp in node.all_input_nodes:
                if kind[inp] == "static" and not is_tensor(inp):
                    node.replace_input_with(inp, over_time(inp))
    kind = classify(gm.graph, marks_time)
    for node in list(gm.graph.nodes):
        if kind[node] != "temporal" or node.op == "output" or is_to_time(node):
            continue
        for inp in node.all_input_nodes:
            if kind[inp] == "static" and is_tensor(inp) and has_batch(inp):  # (sizes were handled above)
                if inp not in shared:
                    shared[inp] = _add_to_time(gm, inp)
                node.replace_input_with(inp, shared[inp])
    gm.graph.lint()
    gm.recompile()
    return classify(gm.graph, marks_time)
