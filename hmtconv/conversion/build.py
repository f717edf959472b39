"""``convert``'s fixed sequence on a calibrated, prepared model (already a private copy):

1. every observed site -> :class:`SpikingActivation` with the policy's lam (sites.py, policies.py);
   eval-mode BatchNorm folded into the convolution before it (fold.py);
2. shapes of every node on a one-sample zero input (tells tensors from sizes); squeezes keep the
   batch dim (batch_dim.py);
3. :class:`ToTime` at static -> temporal edges (multistep.py); nothing after the neurons may mix
   the steps folded into the batch dim (batch_dim.py, before and after 4);
4. expectation compensation for nonlinear ops whose input varies over time (compensated.py), and
   a clear error for any op of the spiking part that is neither structural nor compensable;
5. operation counts for energy (energy.py) and the activation memory profile (memory.py);
6. sites whose input nothing else reads write their output over it.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..device import placement
from .attention import MatMul
from .batch_dim import check_batch_first, check_batch_kept, is_to_time, keep_batch_in_squeezes, reads_spikes
from .compensated import COMPENSATED, Compensated, Divide, Multiply, Power
from .energy import SYNAPTIC, count_operations
from .fold import BATCHNORMS, fold_batchnorm
from .memory import activation_profile
from .functional import arg, assign, scope
from .graph import IDENTITIES, VIEWS, add_child, reads_input, swap_for_module
from .inplace import in_place
from .linear_ops import (ADD_PRODUCT, MASKING, SCALING, STRUCTURAL_FUNCTIONS, STRUCTURAL_METHODS,
                         STRUCTURAL_MODULES)
from .multistep import ToTime, insert_time_expansion, is_tensor
from .policies import NeuronSpec, compute_lams, policy_for_site, unused_patterns
from .sites import ObservedActivation, SpikingActivation, make_neuron
from .snn import SNN, ConversionConfig, ConversionReport
from .swapped_batch import check_module_swapped


def _binary(op: type):
    return lambda node, varying: op() if sum(varying) == 2 and len(node.args) == 2 and not node.kwargs else None


def _quotient(node: fx.Node, varying: list[bool]) -> nn.Module | None:
    """``a / b`` where ``b`` varies over time (``1 / b`` is not linear in ``b``; ``a`` may be a
    constant); a constant ``b`` is a scaling."""
    return Divide() if len(node.args) == 2 and not node.kwargs and varying[1] else None


def _power(node: fx.Node, varying: list[bool]) -> nn.Module | None:
    exponent = 2 if node.target in (torch.square, "square") else arg(node, 1, "exponent")
    number = isinstance(exponent, (int, float)) and not isinstance(exponent, bool)
    return Power(exponent) if varying[0] and number else None


# Nonlinear elementwise calls on time-varying tensors that become compensated modules: target ->
# f(node, which arguments vary) giving the module for this call (None: not this call). Out-of-place
# products of two spike trains (squeeze-and-excitation gates), quotients by one (ConViT), constant
# powers (MetaFormer's StarReLU). Done here, not in graph.normalize, because only here is it known
# which arguments are tensors (``q.size(-1) ** -0.5`` is a number).
ELEMENTWISE = {operator.mul: _binary(Multiply), torch.mul: _binary(Multiply), "mul": _binary(Multiply),
               operator.truediv: _quotient, torch.div: _quotient, "div": _quotient,
               operator.pow: _power, torch.pow: _power, "pow": _power, torch.square: _power, "square": _power}


def swap_sites(net: nn.Module, config: ConversionConfig) -> None:
    sites = {name: site for name, site in net.named_modules() if isinstance(site, ObservedActivation)}
    unused = unused_patterns(config.policy, list(sites))
    if unused:
        raise ValueError(f"policy {config.policy!r}: pattern(s) {', '.join(map(repr, unused))} match no spiking "
                         f"site; sites are named like {', '.join(list(sites)[:3])} (SNN.sites(), result.per_layer)")
    specs = {name: NeuronSpec(config.neuron, config.n, config.T, site.signed, config.granularity == "channel")
             for name, site in sites.items()}
    lams = compute_lams([(site.observer, specs[name], policy_for_site(config.policy, name))
                         for name, site in sites.items()])
    for (name, site), lam in zip(sites.items(), lams):
        lam = lam.to(site.observer.count.device)
        if site.ceiling is not None:  # a clipped ReLU: the neuron's largest output, levels * lam, at most c
            lam = lam.clamp_max(site.ceiling / specs[name].levels)
        net.set_submodule(name, SpikingActivation(make_neuron(specs[name], lam, config.communicate), site.ceiling,
                                                  site.in_place))


def _fail(node: fx.Node, what: str, why: str | None = None) -> None:
    where = scope(node) or "<root>"
    kind = what.split(" ")[0]
    register = (f"if it is a stateless module, call hmtconv.register_compensated({kind})" if " module " in what else
                "if it is a stateless function of its inputs, call it from a small nn.Module and register that "
                "with hmtconv.register_compensated")
    why = why or (f"it is neither linear nor registered for expectation compensation. Replace it with a ReLU, move "
                  f"it before the first ReLU, or, {register}")
    raise ValueError(f"cannot convert {where} ({what}, graph node {node.name!r}): its input varies over "
                     f"time (it is after a spiking neuron), and {why}.")


def _compensated_call(gm: fx.GraphModule, node: fx.Node, module: nn.Module, kinds: dict[fx.Node, str],
                      varying: list[bool]) -> fx.Node:
    inputs = 2 if isinstance(module, (Multiply, Divide)) else 1
    new = swap_for_module(gm, node, Compensated(module, tuple(varying[:inputs])), scope(node),
                          type(module).__name__.lower(), inputs)
    kinds[new] = "temporal"
    return new


def compensate_and_check(gm: fx.GraphModule, kinds: dict[fx.Node, str]) -> None:
    spiky = reads_spikes(gm, kinds)
    # modules also called where no spikes come in (before the first neuron: once, on [B, ...]),
    # which must stay themselves there
    plain = {node.target for node in gm.graph.nodes if node.op == "call_module" and node not in spiky}
    for node in list(gm.graph.nodes):
        if node not in spiky or node.meta.get("tensor_meta") is None:
            continue  # sizes, shape checks (x.shape[0], torch._assert) and tensors made from sizes are fine
        varying = [isinstance(a, fx.Node) and a in spiky and is_tensor(a) for a in node.args]
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            shared = isinstance(module, Compensated)  # a module called at several sites, wrapped at an earlier one
            inner = module.module if shared else module
            if type(inner) in COMPENSATED:
                if isinstance(inner, MatMul) and sum(varying) < 2:
                    continue  # a product with a constant or static operand is linear in the other
                if getattr(inner, "return_indices", False):
                    _fail(node, f"{type(inner).__name__} module {node.target!r}",
                          "it returns indices: where the maximum is changes from step to step. Pool without "
                          "return_indices after the neurons")
                if shared or node.target in plain:  # each call site its own wrapper (flags, step count)
                    parent, _, leaf = node.target.rpartition(".")
                    node.target = add_child(gm, parent, leaf, Compensated(inner, tuple(varying)))
                else:
                    gm.set_submodule(node.target, Compensated(inner, tuple(varying)))
            elif not isinstance(module, STRUCTURAL_MODULES):
                _fail(node, f"{type(module).__name__} module {node.target!r}")
        elif node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            module = ELEMENTWISE[node.target](node, varying) if node.target in ELEMENTWISE else None
            if module is not None:
                spiky.add(_compensated_call(gm, node, module, kinds, varying))
                continue
            factors = varying[1:3] if node.target in ADD_PRODUCT else varying  # (its first argument is added)
            if node.target in SCALING and sum(factors) > 1:
                _fail(node, f"product {name} of two time-varying tensors")
            if node.target in MASKING:
                mask = MASKING[node.target]
                if mask >= len(varying) or varying[mask]:  # (torch.where(x) alone returns indices)
                    _fail(node, f"{name} with a mask computed from spikes", None if mask < len(varying) else
                          "its condition is not a positional argument, or it returns indices")
                continue
            ok = STRUCTURAL_FUNCTIONS if node.op == "call_function" else STRUCTURAL_METHODS
            if node.target not in ok and node.target not in SCALING:
                _fail(node, f"{name} function")
    gm.recompile()


# Modules that return a tensor of their own (not a view or their input itself).
FRESH_OUTPUT = (*SYNAPTIC, *BATCHNORMS,
                nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, Compensated, ToTime,
                SpikingActivation)


# Calls that return a tensor of their own (arithmetic out of place: graph.normalize drops ``out=``) ...
FRESH_FUNCTIONS = {operator.add, torch.add, operator.sub, torch.sub, operator.mul, torch.mul, operator.truediv,
                   torch.div, operator.neg, torch.neg}
# Views each of whose elements is one element of their input, standing for that one only (an
# expanded element stands for many; the pieces of chunk, split and unbind are tuples with readers of
# their own): a neuron may write over its input through them, and rows stay rows.
PLAIN_VIEWS = VIEWS - {"expand", "expand_as", "chunk", "split", "unbind", torch.chunk, torch.split, torch.unbind}


def _owns_its_output(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True when ``node``'s tensor is read by one node only and aliases no other node's tensor:
    a fresh tensor, or a view of one, or an identity module's (Dropout in eval) pass-through of
    one, that nothing else reads on the way."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return False
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, FRESH_OUTPUT) or isinstance(module, IDENTITIES) and _owns_its_output(gm, node.args[0])
    if node.op in ("call_function", "call_method") and node.target in PLAIN_VIEWS:
        return _owns_its_output(gm, node.args[0])
    return node.op == "call_function" and node.target in FRESH_FUNCTIONS


def _written_in_place(node: fx.Node) -> bool:
    """True when a call writes over ``node``'s tensor (``x.mul_(2)``, ``x[i] = v``),
    itself or through a view of it."""
    for user in node.users:
        if not user.args or user.args[0] is not node:
            continue
        if user.op in ("call_function", "call_method") and (in_place(user.target) or user.target is assign):
            return True
        if user.op in ("call_function", "call_method") and user.target in VIEWS and _written_in_place(user):
            return True
    return False


def allow_overwrite(gm: fx.GraphModule) -> None:
    """Let neurons write their output, and compensated ops their running means, over inputs that
    nothing else reads (a fresh activation-sized tensor costs page faults that rival the op); mark
    sites whose ANN-mode output (a signed site's is its input) is later written over in place."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, SpikingActivation):
            module.overwrite_input = _owns_its_output(gm, node.args[0])
            module.output_mutated = _written_in_place(node) or (module.signed and _written_in_place(node.args[0]))
        elif isinstance(module, Compensated):
            module.overwrite_inputs = tuple(node.args.count(a) == 1 and _owns_its_output(gm, a) for a in node.args)


def exchange_running_means(gm: fx.GraphModule, keeps_rows) -> None:
    """Where a compensated op feeds a neuron alone (through views that ``keeps_rows(node)``:
    each of its rows made of the same row of its input), the neuron takes ``F`` of the running
    means and differences it itself; where a neuron feeds only compensated ops (attention's
    operands), it gives them the running means of its outputs. Each saves a pass over memory (the
    op's step difference, its running mean) for the same arithmetic in the neuron (multilevel.py)."""
    def module(node) -> nn.Module | None:
        return gm.get_submodule(node.target) if isinstance(node, fx.Node) and node.op == "call_module" else None

    def passes_rows(node: fx.Node) -> bool:
        if isinstance(module(node), IDENTITIES):
            return True
        index = node.args[1] if node.target is operator.getitem else None
        leading = index[0] if isinstance(index, tuple) and index else index
        return (node.op in ("call_function", "call_method") and node.target in PLAIN_VIEWS and keeps_rows(node)
                and (node.target is not operator.getitem or leading == slice(None)))

    for node in gm.graph.nodes:
        site = module(node)
        if not isinstance(site, SpikingActivation):
            continue
        source = node.args[0]
        while isinstance(source, fx.Node) and len(source.users) == 1 and passes_rows(source):
            source = source.args[0]
        if isinstance(module(source), Compensated) and len(source.users) == 1:
            module(source).emits_means = site.neuron.takes_means = True
        readers = [(user, module(user)) for user in node.users]
        if readers and all(isinstance(m, Compensated) and node not in user.kwargs.values()
                           and all((m.temporal or (True,) * len(user.args))[i]
                                   for i, a in enumerate(user.args) if a is node) for user, m in readers):
            site.neuron.gives_means = True
            for user, m in readers:
                m.means_given = tuple(a is node or (i < len(m.means_given) and m.means_given[i])
                                      for i, a in enumerate(user.args))


def build_snn(net: nn.Module, config: ConversionConfig, report: ConversionReport) -> SNN:
    swap_sites(net, config)
    if not isinstance(net, fx.GraphModule):  # module-swap fallback: every op sees T*B rows
        for name, module in list(net.named_modules()):
            if type(module) in COMPENSATED:
                if getattr(module, "return_indices", False):
                    raise ValueError(f"cannot convert {name} ({type(module).__name__}): it returns indices, and fx "
                                     f"cannot trace the model (module swapping), so it may see spikes, where the "
                                     f"maximum moves from step to step. Pool without return_indices, or make the "
                                     f"model traceable")
                net.set_submodule(name, Compensated(module))
        check_module_swapped(net, report.input_shape)
        return SNN(net, config, report, output_temporal=True, macs=None)
    report.folded_batchnorm = fold_batchnorm(net)
    device, dtype = placement(net)

    def propagate(batch: int) -> dict[fx.Node, torch.Size]:
        with torch.no_grad():
            ShapeProp(net).propagate(torch.zeros((batch, *report.input_shape), device=device, dtype=dtype))
        return {n: n.meta["tensor_meta"].shape for n in net.graph.nodes if is_tensor(n)}
    # at two batch sizes: tensors made in forward without a batch dim keep their shape (the metadata kept is batch 1's)
    shapes = [propagate(2), propagate(1)]

    def batch_dims(node: fx.Node) -> list[int] | None:
        while is_to_time(net, node):
            node = node.args[0]
        if node not in shapes[1] or len(shapes[0][node]) != len(shapes[1][node]):
            return None  # (made by convert, or a squeeze that drops the batch dim at batch 1)
        return [d for d, (a, b) in enumerate(zip(shapes[0][node], shapes[1][node])) if a != b]
    while keep_batch_in_squeezes(net, batch_dims):  # (each rewrite changes the batch-1 shapes after it)
        shapes[1] = propagate(1)
    spiking = {n for n in net.graph.nodes
               if n.op == "call_module" and isinstance(net.get_submodule(n.target), SpikingActivation)}

    def has_batch(node: fx.Node) -> bool:
        return node not in shapes[1] or shapes[0][node] != shapes[1][node]
    kinds = insert_time_expansion(net, lambda node: node in spiking, has_batch)
    check_batch_kept(net, kinds, has_batch)
    compensate_and_check(net, kinds)
    check_batch_first(net, kinds, batch_dims)
    macs = count_operations(net, kinds, reads_input(net.graph))
    allow_overwrite(net)
    exchange_running_means(net, lambda node: batch_dims(node) == [0] == batch_dims(node.args[0])
                           and shapes[0][node][0] == shapes[0][node.args[0]][0])
    output = next(n for n in net.graph.nodes if n.op == "output").args[0]
    return SNN(net, config, report, output_temporal=kinds.get(output) == "temporal", macs=macs,
               memory_profile=activation_profile(net, kinds).to(device))
