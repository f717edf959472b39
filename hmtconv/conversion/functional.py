"""Functional calls as the modules they stand for, so graph editing sees one kind of op.

``F.relu`` becomes ``nn.ReLU``, ``@`` a :class:`MatMul`, ``F.gelu``/``F.silu``/``torch.sigmoid``/...
their activation modules, ``F.softmax`` an ``nn.Softmax``, ``F.max_pool1d/2d/3d`` an ``nn.MaxPool1d/2d/3d``;
``F.layer_norm``, ``F.linear``, ``F.conv1d/2d/3d``, ``F.conv_transpose1d/2d/3d`` and eval-mode
``F.batch_norm`` become modules that share the model's own parameters and buffers (timm's layers
call these functions), so a functional Linear or convolution gets its site and its synapses are
counted like any other; ``F.scaled_dot_product_attention`` is
split into the matmuls and softmax torchvision's attention is decomposed into (attention.py).
:func:`graph.normalize` does the swaps.
"""
from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.nn import functional as F

from .attention import MatMul, add_attention_mask
from .compensated import Amax, Function, InstanceNorm, VectorNorm
from .fold import BatchNormAnyDim
from .inplace import in_place, out_of_place
from .windows import Normalize


def scope(node: fx.Node) -> str:
    """Qualified name of the module whose forward created ``node`` ('' at the root); for a module
    call, the module that calls it."""
    if node.op == "call_module":
        return node.target.rpartition(".")[0]
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def arg(node: fx.Node, index: int, key: str, default=None):
    """Argument ``index`` (positional) or ``key`` (keyword) of call ``node``, else ``default``."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(key, default)


def _softmax(gm: fx.GraphModule, n: fx.Node) -> nn.Module:
    return nn.Softmax(dim=arg(n, 1, "dim"))


def _model_tensor(gm: fx.GraphModule, n: fx.Node, index: int, key: str) -> torch.Tensor | None:
    """The parameter or buffer of the model that argument ``key`` of call ``n`` reads, or the value
    it computes from them alone (BEiT concatenates its q, k and v biases in forward), or None."""
    source = arg(n, index, key)
    if source is None:
        return None
    if isinstance(source, fx.Node) and source.op == "get_attr":
        owner, _, attr = source.target.rpartition(".")
        return getattr(gm.get_submodule(owner), attr)
    value = _constant(gm, source)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"cannot convert {scope(n) or '<root>'} ({n.target.__name__}, graph node {n.name!r}): "
                         f"its {key} is computed in forward from the input, not from the model's parameters or "
                         f"buffers alone; use the torch.nn module instead of the function")
    return value.detach()


class _NotConstant(Exception):
    pass


def _constant(gm: fx.GraphModule, value):
    """``value`` (an argument of a call) evaluated now, where it depends on parameters and buffers
    only; None where it reads the model's input."""
    try:
        return _evaluate(gm, value, {})
    except _NotConstant:
        return None


def _evaluate(gm: fx.GraphModule, value, done: dict):
    if isinstance(value, (list, tuple)):
        return type(value)(_evaluate(gm, v, done) for v in value)
    if isinstance(value, dict):
        return {k: _evaluate(gm, v, done) for k, v in value.items()}
    if not isinstance(value, fx.Node):
        return value
    if value not in done:
        args, kwargs = _evaluate(gm, value.args, done), _evaluate(gm, value.kwargs, done)
        if value.op == "get_attr":
            owner, _, attr = value.target.rpartition(".")
            done[value] = getattr(gm.get_submodule(owner), attr)
        elif value.op == "call_function":
            done[value] = value.target(*args, **kwargs)
        elif value.op == "call_method":
            done[value] = getattr(args[0], value.target)(*args[1:], **kwargs)
        elif value.op == "call_module":
            done[value] = gm.get_submodule(value.target)(*args, **kwargs)
        else:  # the model's input
            raise _NotConstant
    return done[value]


def _as_parameter(tensor: torch.Tensor | None) -> nn.Parameter | None:
    return tensor if tensor is None or isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _weight_and_bias(gm: fx.GraphModule, n: fx.Node, index: int) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    """The model's tensors a norm call reads as its weight and bias (arguments ``index``, ``index + 1``)."""
    return _as_parameter(_model_tensor(gm, n, index, "weight")), _as_parameter(_model_tensor(gm, n, index + 1, "bias"))


def _normalized_shape(n: fx.Node, weight: torch.Tensor | None) -> tuple[int, ...]:
    """The ``normalized_shape`` of a layer or RMS norm call. One read from the input
    (``F.layer_norm(x, x.shape[-1:], w, b)``) is the weight's, which must have it; without a
    weight it is unknown before the model runs: a clear error."""
    shape, found = arg(n, 1, "normalized_shape"), []
    fx.node.map_arg(shape, found.append)
    if not found:
        return shape
    if weight is None:
        raise ValueError(f"cannot convert {scope(n) or '<root>'} ({n.target.__name__}, graph node {n.name!r}): its "
                         f"normalized_shape is read from the input's size in forward and it has no weight to read "
                         f"it from; pass a constant shape or use the torch.nn module")
    return tuple(weight.shape)


def _layer_norm(gm: fx.GraphModule, n: fx.Node) -> nn.Module:
    """An ``nn.LayerNorm`` sharing the call's weight and bias (parameters or buffers of the model)."""
    weight, bias = _weight_and_bias(gm, n, 2)
    module = nn.LayerNorm(_normalized_shape(n, weight), eps=arg(n, 4, "eps", 1e-5))
    module.weight, module.bias = weight, bias
    return module


def _rms_norm(gm: fx.GraphModule, n: fx.Node) -> nn.Module:
    """An ``nn.RMSNorm`` sharing the call's weight."""
    weight = _as_parameter(_model_tensor(gm, n, 2, "weight"))
    module = nn.RMSNorm(_normalized_shape(n, weight), eps=arg(n, 3, "eps"), elementwise_affine=False)
    module.weight = weight
    return module


def _prelu(gm: fx.GraphModule, n: fx.Node) -> nn.Module:
    """An ``nn.PReLU`` sharing the call's slopes."""
    weight = _model_tensor(gm, n, 1, "weight")
    module = nn.PReLU(weight.numel())
    module.weight = _as_parameter(weight)
    return module


def _function(fn) -> Callable[[fx.GraphModule, fx.Node], nn.Module | None]:
    """The factory of a :class:`Function` of ``fn`` holding the call's other arguments; None (the
    call stays) where one of them is computed in forward."""
    def make(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
        computed = []
        fx.node.map_arg((n.args[1:], n.kwargs), computed.append)
        return None if computed else Function(fn, n.args[1:], n.kwargs)
    return make


def _instance_norm(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    """An :class:`InstanceNorm` sharing the call's weight and bias; None (the call stays) where it
    normalizes by running statistics instead of each sample's own (an affine map)."""
    if not arg(n, 5, "use_input_stats", True):
        return None
    module = InstanceNorm(arg(n, 7, "eps", 1e-5))
    module.weight, module.bias = _weight_and_bias(gm, n, 3)
    return module


def _group_norm(gm: fx.GraphModule, n: fx.Node) -> nn.Module:
    """An ``nn.GroupNorm`` sharing the call's weight and bias (timm's GroupNorm1 calls ``F.group_norm``);
    without them its channel count, which only sizes the affine parameters, is the group count."""
    weight, bias = _model_tensor(gm, n, 2, "weight"), _model_tensor(gm, n, 3, "bias")
    groups = arg(n, 1, "num_groups")
    module = nn.GroupNorm(groups, groups if weight is None else weight.numel(), eps=arg(n, 4, "eps", 1e-5),
                          affine=False)
    module.weight, module.bias = _as_parameter(weight), _as_parameter(bias)
    return module


def _linear(gm: fx.GraphModule, n: fx.Node) -> nn.Module:
    """An ``nn.Linear`` sharing the call's weight and bias (timm's Linear calls ``F.linear``), so
    that it gets a site and its synapses are counted like any other."""
    weight = _model_tensor(gm, n, 1, "weight")
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    module.weight, module.bias = _as_parameter(weight), _as_parameter(_model_tensor(gm, n, 2, "bias"))
    return module


def batch_norm(gm: fx.GraphModule, n: fx.Node) -> nn.Module:
    """An eval-mode ``F.batch_norm`` call as a module sharing its statistics, weight and bias."""
    mean, var = _model_tensor(gm, n, 1, "running_mean"), _model_tensor(gm, n, 2, "running_var")
    if mean is None or var is None:
        raise ValueError(f"cannot convert {scope(n) or '<root>'} (batch_norm, graph node {n.name!r}): eval-mode "
                         f"batch_norm without running statistics normalizes each batch by itself")
    module = BatchNormAnyDim(mean.numel(), eps=arg(n, 7, "eps", 1e-5)).eval()
    module.weight, module.bias = _weight_and_bias(gm, n, 3)
    module.running_mean, module.running_var = mean, var
    return module


# The options of F.conv1d/2d/3d and F.conv_transpose1d/2d/3d after (input, weight, bias), in order.
_CONV_OPTIONS = ("stride", "padding", "dilation", "groups")
_TRANSPOSED_OPTIONS = ("stride", "padding", "output_padding", "groups", "dilation")


def _conv(cls: type) -> Callable[[fx.GraphModule, fx.Node], nn.Module]:
    """The factory of ``cls`` (``nn.Conv1d``, 2d, 3d or their ``ConvTranspose``) sharing the call's
    weight and bias, or holding their values where forward computes them from the weights alone
    (timm's weight-standardized convolutions in NFNets)."""
    transposed = issubclass(cls, nn.modules.conv._ConvTransposeNd)  # weight [in, out / groups, ...]

    def make(gm: fx.GraphModule, n: fx.Node) -> nn.Module:
        weight = _model_tensor(gm, n, 1, "weight")
        options = {key: arg(n, 3 + i, key) for i, key in enumerate(_TRANSPOSED_OPTIONS if transposed else _CONV_OPTIONS)
                   if arg(n, 3 + i, key) is not None}
        grouped = weight.shape[1] * options.get("groups", 1)
        channels = (weight.shape[0], grouped) if transposed else (grouped, weight.shape[0])
        module = cls(*channels, weight.shape[2:], bias=False, **options)
        module.weight, module.bias = _as_parameter(weight), _as_parameter(_model_tensor(gm, n, 2, "bias"))
        return module
    return make


def _max_pool(cls: type) -> Callable[[fx.GraphModule, fx.Node], nn.Module | None]:
    """The factory of ``cls`` (``nn.MaxPool1d``, 2d or 3d) from its function's call (None: indices returned)."""
    def make(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
        if arg(n, 6, "return_indices", False):
            return None
        stride = arg(n, 2, "stride") or None  # torch.max_pool2d's default stride is [], the kernel's
        return cls(arg(n, 1, "kernel_size"), stride, arg(n, 3, "padding", 0), arg(n, 4, "dilation", 1),
                   ceil_mode=arg(n, 5, "ceil_mode", False))
    return make


def _clamp(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    """``clamp(x, 0)`` as ``nn.ReLU``, ``clamp(x, lo, hi)`` with constant bounds as
    ``nn.Hardtanh(lo, hi)`` (a clipped ReLU where lo = 0, see sites.is_relu; compensated
    otherwise); None (the call stays) for other clamps."""
    low, high = arg(n, 1, "min"), arg(n, 2, "max")
    if low is None or isinstance(low, fx.Node) or isinstance(high, fx.Node):
        return None
    if high is None:
        return nn.ReLU() if low == 0 else None
    return nn.Hardtanh(float(low), float(high)) if low < high else None


def _log_softmax(gm: fx.GraphModule, n: fx.Node) -> nn.Module:
    return nn.LogSoftmax(dim=arg(n, 1, "dim"))


def _adaptive_max_pool(cls: type) -> Callable[[fx.GraphModule, fx.Node], nn.Module | None]:
    """The factory of ``cls`` (``nn.AdaptiveMaxPool1d``, 2d or 3d) from its function's call (None: indices returned)."""
    return lambda gm, n: None if arg(n, 2, "return_indices", False) else cls(arg(n, 1, "output_size"))


def _amax(gm: fx.GraphModule, n: fx.Node) -> nn.Module:
    return Amax(arg(n, 1, "dim", ()), arg(n, 2, "keepdim", False))


def _max_values(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    """``x.max(dim)`` read only for its values (VOLO's ``x.max(1)[0]``) as an :class:`Amax`, its
    ``[0]`` and ``.values`` readers rerouted to the call (None, left as it is: no dim, or indices read)."""
    values = [u for u in n.users if (u.target is operator.getitem and u.args[1] == 0)
              or (u.target is getattr and u.args[1] == "values")]
    if not isinstance(arg(n, 1, "dim"), int) or len(values) != len(n.users):
        return None
    for user in values:
        user.replace_all_uses_with(n)
        gm.graph.erase_node(user)
    return Amax(arg(n, 1, "dim"), arg(n, 2, "keepdim", False))


def _vector_norm(key: str, default) -> Callable[[fx.GraphModule, fx.Node], nn.Module | None]:
    """The factory of a :class:`VectorNorm` from a call whose order argument is ``key`` (``ord`` of
    ``torch.linalg.vector_norm``, ``p`` of ``torch.norm`` and ``x.norm``, which take a numeric
    order over any dims as a vector norm); None (the call stays) for ``"nuc"`` or a ``dtype``.
    Frobenius (``"fro"``) is the 2-norm of the entries."""
    def make(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
        p = arg(n, 1, key, default)
        p = 2.0 if p == "fro" else p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or n.kwargs.get("dtype") is not None:
            return None
        return VectorNorm(p, arg(n, 2, "dim"), arg(n, 3, "keepdim", False))
    return make


def _linalg_norm(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    """``torch.linalg.norm`` without an order: the 2-norm of the entries over ``dim`` (Frobenius
    over two); with one, a matrix norm over two dims: the call stays."""
    return _vector_norm("ord", "fro")(gm, n) if arg(n, 1, "ord") is None else None


def _plain(cls: type) -> Callable[[fx.GraphModule, fx.Node], nn.Module]:
    """The factory of a module that takes nothing from the call."""
    return lambda gm, n: cls()


# Functional target -> (stem of the new module's name, factory (None: leave the call), number of tensor inputs).
RELU_TARGETS = {F.relu: False, torch.relu: False, torch.relu_: True, "relu": False, "relu_": True}  # -> in-place?
FUNCTIONAL = {
    torch.matmul: ("matmul", _plain(MatMul), 2), operator.matmul: ("matmul", _plain(MatMul), 2),
    torch.bmm: ("matmul", _plain(MatMul), 2), "matmul": ("matmul", _plain(MatMul), 2),
    F.gelu: ("gelu", lambda gm, n: nn.GELU(approximate=n.kwargs.get("approximate", "none")), 1),
    F.silu: ("silu", _plain(nn.SiLU), 1), "silu": ("silu", _plain(nn.SiLU), 1),
    torch.sigmoid: ("sigmoid", _plain(nn.Sigmoid), 1), "sigmoid": ("sigmoid", _plain(nn.Sigmoid), 1),
    F.hardsigmoid: ("hardsigmoid", _plain(nn.Hardsigmoid), 1), F.hardswish: ("hardswish", _plain(nn.Hardswish), 1),
    F.softmax: ("softmax", _softmax, 1), torch.softmax: ("softmax", _softmax, 1), "softmax": ("softmax", _softmax, 1),
    F.log_softmax: ("log_softmax", _log_softmax, 1), torch.log_softmax: ("log_softmax", _log_softmax, 1),
    "log_softmax": ("log_softmax", _log_softmax, 1),
    F.relu6: ("relu6", _plain(nn.ReLU6), 1),
    torch.clamp: ("clamp", _clamp, 1), "clamp": ("clamp", _clamp, 1), torch.clip: ("clamp", _clamp, 1),
    "clip": ("clamp", _clamp, 1), torch.clamp_min: ("clamp", _clamp, 1), "clamp_min": ("clamp", _clamp, 1),
    F.hardtanh: ("hardtanh", lambda gm, n: nn.Hardtanh(arg(n, 1, "min_val", -1.0), arg(n, 2, "max_val", 1.0)), 1),
    F.softplus: ("softplus", lambda gm, n: nn.Softplus(arg(n, 1, "beta", 1.0), arg(n, 2, "threshold", 20.0)), 1),
    F.adaptive_max_pool1d: ("adaptive_max_pool1d", _adaptive_max_pool(nn.AdaptiveMaxPool1d), 1),
    F.adaptive_max_pool2d: ("adaptive_max_pool2d", _adaptive_max_pool(nn.AdaptiveMaxPool2d), 1),
    F.adaptive_max_pool3d: ("adaptive_max_pool3d", _adaptive_max_pool(nn.AdaptiveMaxPool3d), 1),
    F.layer_norm: ("layer_norm", _layer_norm, 1), F.group_norm: ("group_norm", _group_norm, 1),
    torch.layer_norm: ("layer_norm", _layer_norm, 1), torch.group_norm: ("group_norm", _group_norm, 1),
    F.linear: ("linear", _linear, 1),
    F.max_pool1d: ("max_pool1d", _max_pool(nn.MaxPool1d), 1), F.max_pool2d: ("max_pool2d", _max_pool(nn.MaxPool2d), 1),
    F.max_pool3d: ("max_pool3d", _max_pool(nn.MaxPool3d), 1), torch.max_pool1d: ("max_pool1d", _max_pool(nn.MaxPool1d), 1),
    torch.max_pool2d: ("max_pool2d", _max_pool(nn.MaxPool2d), 1), torch.max_pool3d: ("max_pool3d", _max_pool(nn.MaxPool3d), 1),
    F.conv1d: ("conv1d", _conv(nn.Conv1d), 1),
    F.conv2d: ("conv2d", _conv(nn.Conv2d), 1), F.conv3d: ("conv3d", _conv(nn.Conv3d), 1),
    F.conv_transpose1d: ("conv_transpose1d", _conv(nn.ConvTranspose1d), 1),
    F.conv_transpose2d: ("conv_transpose2d", _conv(nn.ConvTranspose2d), 1),
    F.conv_transpose3d: ("conv_transpose3d", _conv(nn.ConvTranspose3d), 1),
    F.leaky_relu: ("leaky_relu", lambda gm, n: nn.LeakyReLU(arg(n, 1, "negative_slope", 0.01)), 1),
    F.elu: ("elu", lambda gm, n: nn.ELU(arg(n, 1, "alpha", 1.0)), 1), F.mish: ("mish", _plain(nn.Mish), 1),
    F.selu: ("selu", _plain(nn.SELU), 1), torch.selu: ("selu", _plain(nn.SELU), 1),
    F.celu: ("celu", lambda gm, n: nn.CELU(arg(n, 1, "alpha", 1.0)), 1),
    torch.celu: ("celu", lambda gm, n: nn.CELU(arg(n, 1, "alpha", 1.0)), 1),
    F.instance_norm: ("instance_norm", _instance_norm, 1),
    torch.tanh: ("tanh", _plain(nn.Tanh), 1), "tanh": ("tanh", _plain(nn.Tanh), 1),
    F.normalize: ("normalize", lambda gm, n: Normalize(arg(n, 1, "p", 2.0), arg(n, 2, "dim", 1), arg(n, 3, "eps", 1e-12)), 1),
    torch.linalg.vector_norm: ("vector_norm", _vector_norm("ord", 2.0), 1),
    torch.linalg.norm: ("norm", _linalg_norm, 1),
    torch.norm: ("norm", _vector_norm("p", "fro"), 1), "norm": ("norm", _vector_norm("p", "fro"), 1),
    torch.amax: ("amax", _amax, 1), "amax": ("amax", _amax, 1),
    torch.max: ("max", _max_values, 1), "max": ("max", _max_values, 1),
    F.rms_norm: ("rms_norm", _rms_norm, 1), torch.rms_norm: ("rms_norm", _rms_norm, 1),
    F.prelu: ("prelu", _prelu, 1), torch.prelu: ("prelu", _prelu, 1),
}
# Stateless functions of one activation, elementwise or along a dim of each sample, that have no
# module of their own: a Function, compensated like GELU (also as methods and in place: x.exp_()).
ONE_ACTIVATION = {torch.exp: "exp", torch.log: "log", torch.log1p: "log1p", torch.expm1: "expm1",
                  torch.sqrt: "sqrt", torch.rsqrt: "rsqrt", torch.erf: "erf", torch.erfc: "erfc", torch.abs: "abs",
                  torch.sin: "sin", torch.cos: "cos", torch.reciprocal: "reciprocal", torch.logsumexp: "logsumexp",
                  F.logsigmoid: "logsigmoid", F.softsign: "softsign", F.tanhshrink: "tanhshrink",
                  F.hardshrink: "hardshrink", F.softshrink: "softshrink", F.glu: "glu",
                  F.local_response_norm: "local_response_norm"}
FUNCTIONAL.update({fn: (stem, _function(fn), 1) for fn, stem in ONE_ACTIVATION.items()})
FUNCTIONAL.update({stem: (stem, _function(fn), 1) for fn, stem in ONE_ACTIVATION.items() if hasattr(torch.Tensor, stem)})
# In-place functions of FUNCTIONAL's (their methods, ``x.clamp_(0, 6)``, are found by name: inplace.py).
IN_PLACE_FUNCTIONS = {torch.clamp_: torch.clamp, torch.clip_: torch.clip, torch.clamp_min_: torch.clamp_min,
                      torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh, F.hardtanh_: F.hardtanh, F.elu_: F.elu,
                      F.leaky_relu_: F.leaky_relu, torch.selu_: torch.selu, torch.celu_: torch.celu}


def functional_call(target) -> tuple[object, bool]:
    """``(the FUNCTIONAL key a call of target stands for, whether the call writes in place)``:
    ``("clamp", True)`` for ``x.clamp_``, ``(torch.sigmoid, True)`` for ``torch.sigmoid_``."""
    if target in IN_PLACE_FUNCTIONS:
        return IN_PLACE_FUNCTIONS[target], True
    if isinstance(target, str) and in_place(target) and out_of_place(target) in FUNCTIONAL:
        return out_of_place(target), True
    return target, False


def decompose_sdpa(gm: fx.GraphModule, node: fx.Node, where: str, add_module) -> fx.Node:
    """Replace a ``F.scaled_dot_product_attention(q, k, v)`` node (called in module ``where``) by
    ``q * scale``, :class:`MatMul` with ``k`` transposed, the mask (a float mask added, a boolean
    one or ``is_causal`` filling -inf where attention is not allowed), ``Softmax(-1)`` and
    :class:`MatMul` with ``v`` (the scale on q, as :class:`DecomposedAttention` does);
    ``add_module(stem, module)`` registers a module and returns its name. A mask is the same at
    every step (convert checks that it does not come from spikes). Dropout and grouped queries
    have no spiking form here: a clear error."""
    q, k, v = node.args[:3]
    mask, dropout = arg(node, 3, "attn_mask", None), arg(node, 4, "dropout_p", 0.0)
    causal, scale = arg(node, 5, "is_causal", False), arg(node, 6, "scale", None)
    if dropout != 0.0 or arg(node, 7, "enable_gqa", False):
        raise ValueError(f"cannot convert {where or '<root>'} (scaled_dot_product_attention, graph node {node.name!r}): "
                         f"attention with dropout or grouped queries does not convert (got dropout_p={dropout}); "
                         f"evaluate in eval mode with as many key/value heads as query heads")
    graph, made = gm.graph, []

    def emit(op: str, target, *args, **kwargs) -> fx.Node:
        made.append(getattr(graph, op)(target, args, kwargs))
        return made[-1]

    with graph.inserting_before(node):
        if scale is None:  # F's default, 1 / sqrt(head dim), read from q at run time
            scale = emit("call_function", operator.pow, emit("call_method", "size", q, -1), -0.5)
        scores = emit("call_module", add_module("scores", MatMul()), emit("call_function", operator.mul, q, scale),
                      emit("call_method", "transpose", k, -2, -1))
        if causal:  # torch's is_causal: query i attends to keys 0..i
            sizes = (emit("call_method", "size", q, -2), emit("call_method", "size", k, -2))
            allowed = emit("call_method", "tril", emit("call_function", torch.ones, sizes, dtype=torch.bool,
                                                       device=emit("call_function", getattr, q, "device")))
            scores = emit("call_function", add_attention_mask, scores, allowed)
        if mask is not None:
            scores = emit("call_function", add_attention_mask, scores, mask)
        attn = emit("call_module", add_module("softmax", nn.Softmax(dim=-1)), scores)
        out = emit("call_module", add_module("mix", MatMul()), attn, v)
    for new in made:  # error messages name the attention module these came from
        new.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return out


def assign(x: torch.Tensor, key, value) -> torch.Tensor:
    """``x[key] = value`` as a new tensor (graph.normalize reroutes later readers of ``x`` to it),
    so the graph's data flow shows the write; linear in ``x`` and ``value`` together."""
    out = x.clone()
    out[key] = value
    return out
