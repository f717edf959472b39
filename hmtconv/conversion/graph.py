"""Graph editing with torch.fx: one fixed sequence of passes run by ``prepare``.

1. :func:`tracing.trace` (``nn.MultiheadAttention`` and Swin's window attention already
   decomposed, so attention is visible: attention.py, windows.py; at the example's image size
   where the forward branches on sizes);
2. :func:`normalize` turns functional ops (``F.relu``, ``torch.relu``, ``x.relu_()``, ``@``,
   ``F.softmax``, ``F.gelu``, ``F.layer_norm``, eval-mode ``F.batch_norm``, ``F.max_pool1d/2d/3d``,
   ``F.conv1d/2d/3d``, ``F.conv_transpose1d/2d/3d``) into modules, one module per call site, so a
   ReLU module reused twice (torchvision's BasicBlock) gets two neurons; ``x[key] = v`` becomes a new tensor
   (:func:`functional.assign`) that later readers of ``x`` read; splits
   ``F.scaled_dot_product_attention`` into its matmuls and softmax (timm's ViTs), drops
   eval-mode ``stochastic_depth`` (an identity then), and calls nothing reads that write nothing;
3. :func:`move_max_pools` rewrites ``relu -> maxpool`` into ``maxpool -> relu`` (max commutes with
   the monotone ReLU), the paper's reordering; with ``identity="maxpool"`` a y = x site is put
   where the ReLU was (``-> identity -> maxpool -> relu``, the "16^{y=x}" column);
4. :func:`insert_sites` turns every ReLU into an observed site, and with ``identity="all"`` puts a
   y = x site before the input of every Conv/Linear and both operands of every MatMul (with
   ``"linear"`` before Conv/Linear inputs only: the matmuls then see compensated float operands);
   only activations of the input spike: a ReLU or a Linear computed from weights alone (Swin V2's
   position-bias MLP) stays a float op, run once like the layers before the first neuron; a
   neuron's output, read directly or through views and eval-mode dropout, is spikes already.
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.nn import functional as F
from torchvision.ops import stochastic_depth

from .attention import Einsum, MatMul
from .energy import SYNAPTIC
from .functional import FUNCTIONAL, RELU_TARGETS, arg, assign, batch_norm, decompose_sdpa, functional_call, scope
from .inplace import in_place
from .layout import made_channels_first, read_channels_first
from .observers import HistogramConfig
from .rebuild import saved_sites
from .sites import ObservedActivation, ceiling_of, is_relu
from .tracing import NotTraceable, trace

# Modules that return their input as it is in eval mode
IDENTITIES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
              nn.Identity)
PASS_THROUGH = (*IDENTITIES, nn.Flatten, nn.Unflatten)  # (a view of their input)

MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _child_name(gm: fx.GraphModule, parent: str, stem: str, taken: set[str] = frozenset()) -> str:
    prefix = f"{parent}.{stem}" if parent else stem
    name, i = prefix, 1
    while _exists(gm, name) or name in taken:
        name, i = f"{prefix}_{i}", i + 1
    return name


def _exists(gm: fx.GraphModule, name: str) -> bool:
    try:
        gm.get_submodule(name)
        return True
    except AttributeError:
        return False


def add_child(gm: fx.GraphModule, parent: str, stem: str, module: nn.Module) -> str:
    """Register ``module`` under ``parent`` with a fresh name from ``stem`` (``stem_1``, ... if
    taken); returns the name."""
    name = _child_name(gm, parent, stem)
    gm.add_submodule(name, module)
    return name


def swap_for_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, parent: str, stem: str,
                    n_inputs: int, inputs: tuple | None = None) -> fx.Node:
    """Replace call ``node`` by a call of ``module`` (registered under ``parent`` from ``stem``) on
    its first ``n_inputs`` arguments, or on ``inputs``; returns the new node."""
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(add_child(gm, parent, stem, module),
                                   tuple(node.args[:n_inputs]) if inputs is None else inputs)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


# Calls whose result may share memory with their first operand.
VIEWS = {"view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "adjoint", "contiguous", "squeeze",
         "unsqueeze", "expand", "chunk", "split", "unbind", "swapaxes", "swapdims", "movedim", "reshape_as", "view_as",
         "expand_as", "narrow", "select", operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.t,
         torch.adjoint, torch.permute, torch.squeeze, torch.unsqueeze, torch.swapaxes, torch.swapdims, torch.movedim,
         torch.chunk, torch.split, torch.unbind, torch.narrow, torch.select}


class LostWrite(ValueError):
    """An in-place write the SNN cannot keep (module swapping could not either: not a fallback)."""


def _reroute_inplace(gm: fx.GraphModule, node: fx.Node, source: fx.Node | None = None) -> None:
    """After ``x.relu_()`` (or ``torch.mul(a, b, out=x)``: ``source`` is ``x``), later readers of
    ``x`` read the call's output instead. Where ``x`` is a view of a tensor read later too
    (``h[:, :2].relu_()``), that write cannot be rerouted: an error."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    to_out, source = source is not None, node.args[0] if source is None else source
    chain = [source]
    while chain[-1].op in ("call_function", "call_method") and chain[-1].target in VIEWS:
        chain.append(chain[-1].args[0])
    if any(order[user] > order[node] and user not in chain for base in chain[1:] for user in base.users):
        if to_out:
            what, fix = "write (out=)", "use the call's result instead of out="
        elif node.target is assign:
            what, fix = "item assignment", "build the tensor out of place (torch.cat, torch.where)"
        else:
            kind = type(gm.get_submodule(node.target)).__name__
            what, fix = kind, f"use an out-of-place {kind} there" + (" (x = F.relu(x))" if kind == "ReLU" else "")
        raise LostWrite(f"cannot convert {scope(node) or '<root>'}: an in-place {what} (graph node {node.name!r}) "
                         f"writes into {source.name}, a view of {chain[-1].name}, which is read afterwards; the "
                         f"SNN cannot keep that write: {fix}")
    for user in list(source.users):
        if user is not node and order[user] > order[node]:
            user.replace_input_with(source, node)


def normalize(gm: fx.GraphModule) -> None:
    """Functional activations -> modules; every ReLU (ReLU6) call site gets a module of its own;
    in-place calls run out of place, later readers of what they wrote reading their result."""
    seen: set[str] = set()
    writers: set[str] = set()  # modules built with inplace=True
    for node in list(gm.graph.nodes):
        written = node.kwargs.get("out") if node.op in ("call_function", "call_method") else None
        if isinstance(written, fx.Node):  # torch.mul(a, b, out=buf): the call out of place, buf's later readers read it
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "out"}
            _reroute_inplace(gm, node, written)
        target = node.target
        if node.op == "call_module" and getattr(gm.get_submodule(target), "inplace", None) is True:
            # nn.ReLU(inplace=True), nn.SiLU(inplace=True), ...: every call out of place, rerouted below; a
            # copy (the module is the model's too, which module swapping takes if normalize fails)
            writers.add(target)
            gm.set_submodule(target, copy.copy(gm.get_submodule(target)))
            gm.get_submodule(target).inplace = False
        if node.op == "call_module" and is_relu(gm.get_submodule(target)):
            inplace = target in writers
            if target in seen:  # a reused ReLU module: this call site gets its own copy
                parent, _, leaf = target.rpartition(".")
                node = swap_for_module(gm, node, copy.deepcopy(gm.get_submodule(target)), parent, leaf, 1)
            seen.add(target)
        elif node.op == "call_module":
            inplace = target in writers
        elif node.op in ("call_function", "call_method") and target in RELU_TARGETS:
            inplace = RELU_TARGETS[target] or bool(node.kwargs.get("inplace", False))
            node = swap_for_module(gm, node, nn.ReLU(), scope(node), "relu", 1)
        elif node.op in ("call_function", "call_method") and functional_call(target)[0] in FUNCTIONAL:
            key, writes = functional_call(target)
            stem, factory, n_inputs = FUNCTIONAL[key]
            module = factory(gm, node)
            if module is None:
                continue
            inplace = writes or bool(node.kwargs.get("inplace", False))  # x.clamp_(0, 6), F.silu(x, inplace=True)
            node = swap_for_module(gm, node, module, scope(node), stem, n_inputs)
        elif node.op == "call_function" and target is F.batch_norm and arg(node, 5, "training", False) is False:
            swap_for_module(gm, node, batch_norm(gm, node), scope(node), "batch_norm", 1)
            continue
        elif node.op == "call_function" and target is operator.setitem:
            node.target = assign
            _reroute_inplace(gm, node)
            continue
        elif node.op == "call_function" and target is stochastic_depth and not arg(node, 3, "training", True):
            node.replace_all_uses_with(node.args[0])  # identity in eval mode (torchvision's ConvNeXt, EfficientNet)
            gm.graph.erase_node(node)
            continue
        elif node.op == "call_function" and target is torch.einsum:
            equation, *operands = node.args[0], *(node.args[1] if len(node.args) == 2 and isinstance(
                node.args[1], (list, tuple)) else node.args[1:])
            if len(operands) == 2:  # a product of two activations: a matmul with named dims
                swap_for_module(gm, node, Einsum(equation), scope(node), "einsum", 2, tuple(operands))
            else:  # operands listed flat, so convert sees which of them vary over time
                node.args = (equation, *operands)
            continue
        elif node.op == "call_function" and target is F.scaled_dot_product_attention:
            where = scope(node)
            decompose_sdpa(gm, node, where, lambda stem, module: add_child(gm, where, stem, module))
            continue
        else:
            continue
        if inplace:
            _reroute_inplace(gm, node)
    _drop_unread(gm)


def _drop_unread(gm: fx.GraphModule) -> None:
    """Calls whose results nothing reads go, unless they write (``x.add_(1)``, ``torch._assert``):
    ``nn.MultiheadAttention``'s averaged weights that ``o, _ = mha(x, x, x)`` ignores (a second
    reader of the softmax would keep its neuron from writing in place and from taking running
    means, build.py), a hook's ``out.mean().item()`` traced with its block (a reduction over the
    batch dim the SNN could not keep)."""
    for node in reversed(list(gm.graph.nodes)):
        if node.users or node.op not in ("call_function", "call_method"):
            continue
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if not (in_place(name) or node.op == "call_function" and node.is_impure()):
            gm.graph.erase_node(node)


def _is_relu(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and is_relu(gm.get_submodule(node.target))


def move_max_pools(gm: fx.GraphModule, identity_site: bool, hist: HistogramConfig | None) -> None:
    """``relu -> maxpool`` becomes ``[y = x site ->] maxpool -> relu`` when the ReLU feeds only the pool."""
    for pool in list(gm.graph.nodes):
        if not (pool.op == "call_module" and isinstance(gm.get_submodule(pool.target), MAX_POOLS)):
            continue
        relu = pool.args[0]
        if not _is_relu(gm, relu) or len(relu.users) != 1 or gm.get_submodule(pool.target).return_indices:
            continue  # stays after the neuron; convert wraps it with expectation compensation (or refuses it)
        pre = relu.args[0]
        if identity_site:
            pre = _add_site(gm, pre, signed=True, name=_child_name(gm, scope(relu), "identity"), hist=hist,
                            before=relu, channels_first=made_channels_first(gm, pre))
        pool.replace_all_uses_with(relu)
        pool.update_arg(0, pre)
        relu.update_arg(0, pool)
        pool.append(relu)  # keep topological order: relu now runs after the pool


def _add_site(gm, source: fx.Node, signed: bool, name: str, hist: HistogramConfig | None, before: fx.Node,
              channels_first: bool) -> fx.Node:
    gm.add_submodule(name, ObservedActivation(signed, hist, channels_first))
    with gm.graph.inserting_before(before):
        node = gm.graph.call_module(name, (source,))
    node.meta = dict(source.meta)
    return node


def insert_sites(gm: fx.GraphModule, identity: str, hist: HistogramConfig | None) -> None:
    """ReLU modules -> unsigned sites; with ``identity="all"`` a shared y = x site per input of every
    Conv/Linear and both operands of every MatMul, with ``"linear"`` only per Conv/Linear input;
    each only where the activation depends on the model's input."""
    of_input = reads_input(gm.graph)
    for node in list(gm.graph.nodes):
        if _is_relu(gm, node) and node in of_input:
            ceiling, first = ceiling_of(gm.get_submodule(node.target)), made_channels_first(gm, node.args[0])
            gm.add_submodule(node.target, ObservedActivation(False, hist, first, ceiling))
    if identity not in ("all", "linear"):
        return
    sites: dict[fx.Node, fx.Node] = {}
    skipped: set[str] = set()  # names of calls fed spikes through views: taken, so later calls' names do not
    # depend on which calls were skipped (load_snn's rebuild may put some back)
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        operands = (2 if identity == "all" else 0) if isinstance(module, MatMul) \
            else 1 if isinstance(module, SYNAPTIC) else 0
        for i, source in enumerate(node.args[:operands]):
            if source not in of_input or _is_site(gm, source):
                continue  # computed from weights alone, or a shared site
            if source not in sites:
                name = _child_name(gm, scope(node), f"{node.target.rsplit('.', 1)[-1]}_in{i if operands == 2 else ''}",
                                   skipped)
                if _is_site(gm, _passed_through(gm, source)) and name not in saved_sites():
                    skipped.add(name)
                    continue  # spikes already (a neuron's output, viewed or through dropout)
                sites[source] = _add_site(gm, source, True, name, hist, before=node,
                                          channels_first=read_channels_first(module))
            node.update_arg(i, sites[source])


# Reads of a tensor's metadata, not its values (a position embedding built from the input's size
# is the same for every image), and tensors made from it alone (a zero buffer filled later).
METADATA_METHODS, METADATA_ATTRIBUTES = {"size", "dim", "numel"}, {"shape", "device", "dtype", "ndim"}
SHAPE_ONLY = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
              "new_zeros", "new_ones", "new_empty", "new_full"}


def made_from_shape(node: fx.Node) -> bool:
    """A tensor made from another one's size and dtype alone (``zeros_like``, ``x.new_zeros``)."""
    return node.op in ("call_function", "call_method") and node.target in SHAPE_ONLY


def computed_from(graph: fx.Graph, is_source: Callable[[fx.Node], bool],
                  reads_values: Callable[[fx.Node, fx.Node], bool]) -> set[fx.Node]:
    """The sources and the nodes computed from their values: a node is when it reads the values
    (``reads_values(node, input)``), not only the sizes, of an input that is."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if is_source(node) or any(i in found and reads_values(node, i) for i in node.all_input_nodes):
            found.add(node)
    return found


def reads_input(graph: fx.Graph) -> set[fx.Node]:
    """The nodes computed from the values of the model's input (its sizes, device and dtype aside)."""
    def reads_values(node: fx.Node, _) -> bool:
        metadata = (node.op == "call_method" and node.target in METADATA_METHODS) or (
            node.op == "call_function" and node.target is getattr and node.args[1] in METADATA_ATTRIBUTES)
        return not metadata and not made_from_shape(node)
    return computed_from(graph, lambda node: node.op == "placeholder", reads_values)


def _passed_through(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """Where the values of ``node`` come from through views (flatten, reshape, slices) and eval-mode
    dropout or identity modules, which hand them on unchanged (VGG's classifier reads a neuron
    through Dropout: spikes already, as module swapping sees too)."""
    while node.args:  # (an input passed by keyword: the walk stops there)
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if not (type(module) in PASS_THROUGH and not module.training  # (not a subclass's forward)
                or node.op in ("call_function", "call_method") and node.target in VIEWS):
            break
        node = node.args[0]
    return node


def _is_site(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), ObservedActivation)


def _normalized(gm: fx.GraphModule) -> None:
    try:
        normalize(gm)
    except LostWrite:
        raise
    except ValueError as error:
        raise NotTraceable(f"{type(error).__name__}: {error}") from error


def prepare_graph(model: nn.Module, identity: str, hist: HistogramConfig | None,
                  example: torch.Tensor | None = None) -> tuple[fx.GraphModule, bool]:
    """The prepared graph, and whether it is specialized to ``example``'s image size."""
    gm, sized = trace(model, example)
    try:
        _normalized(gm)
    except NotTraceable as error:
        if sized or example is None:
            raise
        try:  # a size read from the input where a module needs a number (F.layer_norm(x, x.shape[-1:])
            # without a weight): one at the example's image size
            gm, sized = trace(model, example, sized=True)
            _normalized(gm)
        except NotTraceable:
            raise error from None
    move_max_pools(gm, identity == "maxpool", hist)
    insert_sites(gm, identity, hist)
    gm.graph.lint()
    gm.recompile()
    return gm, sized
