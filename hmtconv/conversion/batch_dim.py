"""The batch dim, which the SNN shares with the time steps (``[T*B, ...]`` after the neurons).

Which tensors carry spike values (:func:`reads_spikes`), squeezes that keep it
(:func:`keep_batch_in_squeezes`), and the checks that nothing after the neurons would mix the
steps folded into that dim: a reduction over it, an op that moves rows along it, an activation
with the batch elsewhere than dim 0 read by a neuron, a compensated op or the output. Each is a
clear error naming the graph node.
"""
from __future__ import annotations

import math
import operator

import torch
from torch import fx

from .functional import arg, scope
from .graph import computed_from, made_from_shape
from .multistep import TimeAware, ToTime, is_tensor
from .sites import SpikingActivation


def reads_spikes(gm: fx.GraphModule, kinds: dict[fx.Node, str]) -> set[fx.Node]:
    """The tensors computed from spike trains' values: a neuron's output and whatever reads one.
    A tensor made from sizes alone (``torch.ones(x.size(1), ...)``, a causal mask, ``zeros_like``)
    or from a static tensor repeated at every step is laid out over ``T*B`` rows (temporal) but the
    same at every step, so any op may run on it per step."""
    def is_site(node: fx.Node) -> bool:
        return kinds[node] == "temporal" and node.op == "call_module" and \
            isinstance(gm.get_submodule(node.target), SpikingActivation)

    def reads_values(node: fx.Node, source: fx.Node) -> bool:
        # (tensor_meta is there for tensors and tuples of them, as unbind returns; not for sizes)
        return kinds[node] == "temporal" and not made_from_shape(node) and source.meta.get("tensor_meta") is not None
    return computed_from(gm.graph, is_site, reads_values)


def _first_index(node: fx.Node):
    """The index along dim 0 of a ``x[key]`` node."""
    key = node.args[1]
    return key[0] if isinstance(key, tuple) and key else key


def picks_a_row_of_steps_alike(gm: fx.GraphModule, kinds: dict[fx.Node, str]) -> set[fx.Node]:
    """The ``x[i, ...]`` nodes (``i`` an int) of tensors that read no spikes: such a tensor is the
    same at every step (position features expanded over the batch, Perceiver's ``pos[0]``), so
    its row ``i`` is the ANN's row ``i`` though the steps are folded into the batch dim."""
    spiky = reads_spikes(gm, kinds)
    return {node for node in gm.graph.nodes if node.target is operator.getitem and node not in spiky
            and isinstance(_first_index(node), int)}


def check_batch_kept(gm: fx.GraphModule, kinds: dict[fx.Node, str], has_batch) -> None:
    """A reduction over the batch dim (``a.mean(0)``) after the neurons would mix the time steps,
    which the SNN folds into that dim: a clear error (picking one row of a tensor the same at every
    step is not: :func:`picks_a_row_of_steps_alike`)."""
    same_rows = picks_a_row_of_steps_alike(gm, kinds)
    for node in gm.graph.nodes:
        if node in same_rows:
            continue
        if kinds.get(node) == "temporal" and is_tensor(node) and not has_batch(node) and any(
                kinds.get(i) == "temporal" and is_tensor(i) and has_batch(i) for i in node.all_input_nodes):
            raise ValueError(f"cannot convert {scope(node) or '<root>'} (graph node {node.name!r}): it reduces over "
                             f"the batch dim of an activation after the neurons, and the SNN folds the time steps "
                             f"into that dim; keep statistics per sample (or move this before the first ReLU)")


def keep_batch_in_squeezes(gm: fx.GraphModule, batch_dims) -> bool:
    """``x.squeeze()`` (or ``squeeze(0)``) of an activation with its batch in dim 0 squeezes its
    other dims only: at batch 1 and T = 1 it would drop the dim the SNN folds the steps into, so
    that the steps' outputs lost their batch dim (at batch 1 the SNN keeps a dim of size 1 where
    the ANN drops it; at other batch sizes nothing changes). Returns whether any changed.
    ``batch_dims(node)``: as for :func:`check_batch_first`."""
    changed = False
    for node in gm.graph.nodes:
        if node.target not in ("squeeze", torch.squeeze) or node.op not in ("call_method", "call_function"):
            continue
        source, dims = node.args[0], arg(node, 1, "dim")
        if not isinstance(source, fx.Node) or batch_dims(source) != [0]:
            continue
        rank = len(source.meta["tensor_meta"].shape)
        dims = range(rank) if dims is None else dims if isinstance(dims, (tuple, list)) else (dims,)
        if any(d % rank == 0 for d in dims):
            node.args, node.kwargs = (source, tuple(d for d in dims if d % rank != 0)), {}
            changed = True
    if changed:
        gm.recompile()
    return changed


def is_to_time(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), ToTime)


RESHAPES = {"view", "reshape", torch.reshape, "unflatten", torch.unflatten, "view_as", "reshape_as"}


def _dims_along(node: fx.Node) -> list | None:
    """The dims a call that moves rows along them acts on (``torch.cat``, chunk, split, narrow,
    index_select, cumsum, roll, flip; slicing: dim 0 unless its first index takes every row), as written
    (negative ones too); None: all of them (a roll without dims)."""
    target, rest = node.target, node.args[1:]
    if target is torch.cat:
        return [arg(node, 1, "dim", 0)]
    if target in ("chunk", torch.chunk, "split", torch.split):
        return [arg(node, 2, "dim", 0)]
    if target in ("narrow", torch.narrow, "index_select", torch.index_select, "cumsum", torch.cumsum):
        return [arg(node, 1, "dim")]
    if target in ("roll", torch.roll):
        dims = arg(node, 2, "dims")
    elif target in ("flip", torch.flip):
        dims = rest if len(rest) > 1 else arg(node, 1, "dims")  # (x.flip(0, 1), x.flip((0, 1)))
    elif target is operator.getitem:
        first = _first_index(node)
        return [] if first is Ellipsis or first is None or first == slice(None) else [0]
    else:
        return []
    return None if dims is None else list(dims) if isinstance(dims, (tuple, list)) else [dims]


def _indexes_every_row(node: fx.Node, batch_dims) -> bool:
    """``x[i, ...]`` where ``i`` is ``torch.arange(n)`` over the whole batch dim with dims added
    (Hugging Face's attention masks are built as ``mask[arange(B)[:, None, None, None], kv]``):
    every row stays where it is, the time steps folded into that dim included."""
    index = _first_index(node)
    while isinstance(index, fx.Node) and index.target is operator.getitem and all(
            k is None or k is Ellipsis or k == slice(None) for k in (
                index.args[1] if isinstance(index.args[1], tuple) else (index.args[1],))):
        index = index.args[0]
    if not (isinstance(index, fx.Node) and index.target is torch.arange and len(index.args) == 1 and is_tensor(index)):
        return False
    return batch_dims(index) == [0] and index.meta["tensor_meta"].shape[0] == node.args[0].meta["tensor_meta"].shape[0]


def check_batch_first(gm: fx.GraphModule, kinds: dict[fx.Node, str], batch_dims) -> None:
    """Neurons, compensated ops and :class:`ToTime` (un)fold the steps along dim 0, and so does the
    SNN with its output: an activation they read with the batch in another dim (tokens first,
    ``x.permute(1, 0, 2)``) would have its steps mixed with tokens, a clear error; so is an op that
    moves rows along the batch dim after the neurons (``torch.cat([h, h2], 0)``, ``h.chunk(2, 0)``,
    ``h.view(2, -1, C)``: test-time augmentation undone), which would move them to other steps
    (indexing with ``arange`` over the whole dim, or picking a row of a tensor the same at every
    step, moves none).
    ``batch_dims(node)``: the dims of ``node``'s value that the batch size changes (None: unknown)."""
    same_rows = picks_a_row_of_steps_alike(gm, kinds)
    for node in gm.graph.nodes:
        if node in same_rows:
            continue
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), TimeAware):
            reads = node.all_input_nodes
            reader = next(iter(node.users), node) if is_to_time(gm, node) else node  # (ToTime: the op it feeds)
        elif node.op == "output" and isinstance(node.args[0], fx.Node) and kinds.get(node.args[0]) == "temporal":
            reads, reader = [node.args[0]], None
        elif kinds.get(node) == "temporal" and node.op in ("call_function", "call_method") and node.args:
            source = node.args[0][0] if node.target is torch.cat and node.args[0] else node.args[0]
            if not (isinstance(source, fx.Node) and is_tensor(source)):
                continue
            dims = batch_dims(source) or []
            every_row = node.target is operator.getitem and _indexes_every_row(node, batch_dims)
            along = [] if every_row else _dims_along(node)
            rank = len(source.meta["tensor_meta"].shape)
            moves = dims and (along is None or any(isinstance(d, int) and d % rank in dims for d in along))
            out = batch_dims(node)  # (a reshape to [1, T*B, ...] splits off nothing: unsqueeze(0))
            splits = node.target in RESHAPES and dims == [0] and out not in (None, [], [0]) and \
                math.prod(node.meta["tensor_meta"].shape[:out[0]]) > 1
            if moves or splits:
                raise ValueError(f"cannot convert {scope(node) or '<root>'} (graph node {node.name!r}): it "
                                 f"{'splits' if splits else 'moves rows along'} the batch dim of an activation after "
                                 f"the neurons, and the SNN folds the time steps into that dim (each step's rows "
                                 f"would go to other steps); do it before the first ReLU, or along another dim")
            continue
        else:
            continue
        for source in reads:
            dims = batch_dims(source)
            if dims and dims != [0]:
                where = "the model's output" if reader is None else \
                    f"{scope(reader) or '<root>'} (graph node {reader.name!r})"
                shape = list(source.meta["tensor_meta"].shape)
                made_in = scope(source) or "<root>"
                raise ValueError(f"cannot convert {where}: it reads {source.name} (made in {made_in}, "
                                 f"shape {shape} at batch 1), an activation whose dim(s) {dims} change with the "
                                 f"batch size, but only dim 0 may: the SNN folds the time steps into dim 0 for its "
                                 f"neurons, compensated ops and output. Keep the batch dim first there and alone "
                                 f"(batch_first layouts, x.transpose(0, 1) back before the layer, no broadcasting "
                                 f"between samples; x.t(), x.T and x.mT of a 2-d [B, F] activation swap its batch "
                                 f"dim: transpose it back, or transpose the weight instead)")
