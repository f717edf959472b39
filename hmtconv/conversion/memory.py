"""Activation memory of a simulation, and the batch chunk that keeps it under a budget.

An SNN run holds ``[T*B, ...]`` activations, so its memory grows with T. ``evaluate`` can split
each batch into chunks of samples (every sample is simulated independently, so the results do not
depend on the chunking); :func:`chunk_size` picks the largest chunk whose estimated peak fits.

The estimate, per sample, walks the traced graph in execution order (fx frees each value after its
last use): at every node the live values are counted, temporal ones T times, plus the scratch of
the time-aware op running there (a neuron keeps about 6 per-step tensors, a compensated op about
3 full-length ones). Module-swapped models (no graph) count every leaf module's output (an upper
bound). Ops allocate temporaries this walk does not see: the live activation memory measured by
benchmarks/memory.py (resnet18, 64x64, T = 16) was 1.19-1.27x the walk's figure, so the estimate is
scaled by ``MARGIN``. The figure is for activations only; weights and the data batch come on top.
"""
from __future__ import annotations

import re

import torch
from torch import fx, nn

from .compensated import Compensated
from .multistep import is_tensor
from .sites import SpikingActivation

NEURON_SCRATCH = 6  # per-step tensors a neuron allocates (membranes, outputs, levels, counts)
COMPENSATED_SCRATCH = 3  # full-length tensors a compensated op allocates (running means, F, output)
MARGIN = 1.3  # measured live memory / walk estimate was 1.19-1.27 (see above)


def node_bytes(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    return meta.shape.numel() * torch.empty((), dtype=meta.dtype).element_size() if is_tensor(node) else 0


def activation_profile(gm: fx.GraphModule, kinds: dict[fx.Node, str]) -> torch.Tensor:
    """``[nodes, 2]`` float64: (static bytes, bytes per step) live at each node for one sample, so the
    peak at T steps is ``max(static + T * per_step)``. Needs ShapeProp's ``tensor_meta`` (batch 1)."""
    nodes = list(gm.graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    expires: dict[int, list[fx.Node]] = {}
    live = {"static": 0.0, "temporal": 0.0}
    rows = []
    for i, node in enumerate(nodes):
        if kinds.get(node) in live:
            live[kinds[node]] += node_bytes(node)
            expires.setdefault(max((order[u] for u in node.users), default=i), []).append(node)
        static, step = live["static"], live["temporal"]
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, SpikingActivation):
                static += NEURON_SCRATCH * node_bytes(node)  # per-step scratch, not per step of T
            elif isinstance(module, Compensated):
                step += COMPENSATED_SCRATCH * node_bytes(node)
        rows.append((static, step))
        for done in expires.pop(i, []):
            live[kinds[done]] -= node_bytes(done)
    return torch.tensor(rows or [(0.0, 0.0)], dtype=torch.float64)


@torch.no_grad()
def leaf_output_bytes(net: nn.Module, input_shape: tuple[int, ...], device: torch.device,
                      dtype: torch.dtype) -> float:
    """Bytes of every leaf module's output for one sample and one step (module-swapped models), run
    on a zero image of the model's ``device`` and ``dtype``."""
    total = [0.0]

    def hook(module, args, out):
        if isinstance(out, torch.Tensor):
            total[0] += out[:1].numel() * out.element_size()

    leaves = [m for m in net.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        net(torch.zeros((1,) + tuple(input_shape), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def cpu_chunk(steps: int) -> int:
    """Samples per chunk when the user sets no bound, on CPU: ``512 // T`` clamped to 32..64.

    A step's working set beyond the last-level cache makes every neuron and compensation pass
    memory-bound; chunks too small pay per-op overhead T times over. Measured on the project's
    machine (benchmarks/README.md, batches of 128-256): 1.25-1.4x faster than whole batches for the
    ViT and for VGG at T = 16, within the machine's noise elsewhere (T = 4 prefers ~64 samples,
    T = 16 ~32). Accelerators keep whole batches."""
    return min(64, max(32, 512 // steps))


def available_memory() -> int | None:
    """What the system can give without swapping (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def chunk_size(per_sample_bytes: float, budget_bytes: int, batch: int) -> int:
    """The largest number of samples (at least 1, at most ``batch``) whose activations fit the budget."""
    if budget_bytes <= 0:
        raise ValueError(f"memory budget must be positive, got {budget_bytes} bytes")
    return max(1, min(batch, int(budget_bytes // max(per_sample_bytes, 1.0))))


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def format_bytes(size: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: three significant digits in the largest unit that fits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.3g} {unit}"
        size /= 1024


def parse_bytes(text: str) -> int:
    """``"512MB"``, ``"4G"``, ``"1.5GiB"``, ``"1000000"`` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS.get(unit, 0) < 1:
        raise ValueError(f"cannot read memory size {text!r}; write a number of at least one byte with an optional "
                         f"unit, e.g. 512MB, 4GB or 1.5GiB")
    return int(float(match.group(1)) * _UNITS[unit])
