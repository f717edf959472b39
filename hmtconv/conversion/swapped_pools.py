"""Max pooling moved before the neuron in a module-swapped model (one fx cannot trace), as the
traced graph moves it (graph.move_max_pools): ``relu -> maxpool`` becomes ``maxpool -> relu``
(the max commutes with the monotone ReLU), so the neuron's threshold fits the pooled values and
no pooling runs on spikes.

Without a graph, :func:`pool_moves` finds the pairs by running a zero image of the example's size
(the same on every torchrun rank and in ``load_snn``'s rebuild): a ReLU module called once whose
output goes to one max pooling module, called once, and to nothing else (no other call reads it or
a view of it, nor does the model return it; the pool is a plain ``nn.MaxPool1d/2d/3d`` without
hooks). The data may take another path: the ReLU module still returns its float ReLU
(:class:`MovedReLU`, which keeps its input), and the pool pools that input and runs the neuron
only when it is handed that very output (:class:`PooledSite`); else it pools what it gets, as it
would unmoved. So the model's function is kept on any path.
"""
from __future__ import annotations

import contextlib
from collections import Counter, OrderedDict, defaultdict

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .graph import MAX_POOLS, SHAPE_ONLY
from .sites import unsigned_output
from .tracing import hooked
from .unconverted import storage_id

Tensor = torch.Tensor


def probe(model: nn.Module, x: torch.Tensor, hooks: list, mode: TorchFunctionMode | None = None) -> tuple[bool, object]:
    """Run ``model`` on ``x`` (cloned: an in-place op on the input would write the caller's batch)
    without autograd, under ``mode`` if given, then remove ``hooks``: ``(ran, output)``, ran False
    where the model fails on it (calibration says why)."""
    try:
        with torch.no_grad(), (mode or contextlib.nullcontext()):
            return True, model(x.clone())
    except Exception:
        return False, None
    finally:
        for hook in hooks:
            hook.remove()


class _Readers(TorchFunctionMode):
    """Every call that reads a watched storage (a ReLU's output), by who made it: the max pooling
    module then running, or None (any other code)."""

    def __init__(self):
        super().__init__()
        self.watched: dict[int, str] = {}  # storage -> the ReLU module whose output it holds
        self.pool: str | None = None  # the max pooling module running
        self.readers: dict[str, set[str | None]] = defaultdict(set)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        method = getattr(func, "__name__", "")
        if self.watched and func not in SHAPE_ONLY and method not in SHAPE_ONLY:
            for t in tree_leaves((args, kwargs)):
                relu = self.watched.get(storage_id(t)) if isinstance(t, Tensor) else None
                if relu is not None:
                    self.readers[relu].add(self.pool)
        return func(*args, **(kwargs or {}))


def pool_moves(model: nn.Module, zeros: torch.Tensor | None, relus: set[str]) -> dict[str, str]:
    """``{relu: pool}``: the ReLU modules (named in ``relus``) whose output only the max pooling
    module ``pool`` reads, on ``zeros`` (none without it, or where the model fails on it)."""
    if zeros is None or not relus:
        return {}
    # (exactly these types, whose max commutes with the ReLU; a hook on the pool would run on the
    # values before the ReLU)
    pools = {name for name, module in model.named_modules() if type(module) in MAX_POOLS
             and not module.return_indices and not hooked(module)}
    if not pools:
        return {}
    mode, calls, kept, inputs = _Readers(), Counter(), {}, {}

    def relu_done(name):
        def hook(module, args, out):
            calls[name] += 1
            with torch._C.DisableTorchFunction():
                key = storage_id(out)
            if key is not None:
                mode.watched[key] = name
            kept[name] = out  # (held, so that no later tensor reuses its storage)
        return hook

    def pool_starts(name):
        def hook(module, args):
            calls[name] += 1
            mode.pool, inputs[name] = name, args[0]
        return hook

    def pool_done(module, args, out):
        mode.pool = None

    hooks = [model.get_submodule(name).register_forward_hook(relu_done(name)) for name in relus]
    for name in pools:
        pool = model.get_submodule(name)
        hooks += [pool.register_forward_pre_hook(pool_starts(name)), pool.register_forward_hook(pool_done)]
    ran, out = probe(model, zeros, hooks, mode)
    if not ran:
        return {}
    returned = {storage_id(t) for t in tree_leaves(out) if isinstance(t, Tensor)}
    moves = {}
    for relu, output in kept.items():
        readers = mode.readers[relu]
        pool = next(iter(readers)) if len(readers) == 1 else None
        if (pool is not None and calls[relu] == 1 and calls[pool] == 1 and inputs[pool] is output
                and storage_id(output) not in returned):
            moves[relu] = pool
    return moves


class MovedReLU(nn.Module):
    """A ReLU (clipped at ``ceiling``) whose neuron moved after the max pooling it feeds: returns
    its float output, for any other reader the data may give it, and keeps its input for the pool."""

    def __init__(self, ceiling: float | None, in_place: bool):
        super().__init__()
        self.ceiling, self.in_place = ceiling, in_place
        self.input = self.output = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input = x.clone() if self.in_place else x
        self.output = unsigned_output(x, self.ceiling, self.in_place)
        return self.output

    def take(self, x: torch.Tensor) -> torch.Tensor | None:
        """The input of the call that returned ``x`` (None: ``x`` is not its last output)."""
        if x is not self.output:
            return None
        found, self.input, self.output = self.input, None, None
        return found


class PooledSite(nn.Sequential):
    """``(pool, relu)``: max pooling moved before the neuron of the ReLU module ``relu_name`` (now a
    :class:`MovedReLU`, after a y = x site with ``identity="maxpool"``): handed that module's
    output, it pools the module's input and runs the neuron; handed anything else, the pool alone."""

    def __init__(self, pool: nn.Module, site: nn.Module, relu_name: str, moved: MovedReLU, in_place: bool):
        super().__init__(OrderedDict(pool=pool, relu=site))
        self.relu_name, self.in_place = relu_name, in_place  # (the ReLU module's: fallback.as_saved)
        self.__dict__["moved"] = moved  # (not a child: it has its own place in the model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = self.moved.take(x)
        return self.pool(x) if before is None else self.relu(self.pool(before))
