"""torchvision's VisionTransformer as the paper's ViT recipe describes its SNN, written from the
paper and its state dict alone (test oracle: shares no code with hmtconv's graph passes).

One forward, run for the ANN and, one time step after another, for the SNN: a signed H-MT site
before every Linear/Conv input (the image itself, q/k/v's projection, the output projection, both
MLP layers, the head) and before both operands of the two attention matmuls (q, k, the softmax
probabilities, v); LayerNorm, softmax, GELU and both products with expectation compensation
(step t emits ``t F(mean of steps 1..t) - (t-1) F(mean of steps 1..t-1)``). q is scaled by
1/sqrt(head dim) before its site (convert's choice; with thresholds that scale with the input,
as eq. 29's do, the output is the same either way).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch.nn import functional as F

from reference import basal_fire, moments


def _layer_norm(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-6)


def forward(sd: dict, heads: int, images: torch.Tensor, site, compensated) -> torch.Tensor:
    """``site(name, x)`` at each spiking site, ``compensated(name, F, *xs)`` at each float op."""
    x = site("patch_in", images)
    x = F.conv2d(x, sd["conv_proj.weight"], sd["conv_proj.bias"], stride=sd["conv_proj.weight"].shape[-1])
    batch, width = x.shape[:2]
    x = torch.cat([sd["class_token"].expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + sd["encoder.pos_embedding"]
    head_dim, layers = width // heads, len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    for layer in range(layers):
        p = f"encoder.layers.encoder_layer_{layer}."
        h = site(f"{layer}.qkv_in", compensated(f"{layer}.ln_1", partial(_layer_norm, sd, p + "ln_1"), x))
        q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in F.linear(
            h, sd[p + "self_attention.in_proj_weight"], sd[p + "self_attention.in_proj_bias"]).split(width, -1))
        q, k = site(f"{layer}.q", q / math.sqrt(head_dim)), site(f"{layer}.k", k)
        scores = compensated(f"{layer}.qk", lambda a, b: a @ b.transpose(-2, -1), q, k)
        probs = site(f"{layer}.probs", compensated(f"{layer}.softmax", lambda s: s.softmax(-1), scores))
        mixed = compensated(f"{layer}.mix", torch.matmul, probs, site(f"{layer}.v", v))
        mixed = site(f"{layer}.out_proj_in", mixed.transpose(1, 2).flatten(2))
        x = x + F.linear(mixed, sd[p + "self_attention.out_proj.weight"], sd[p + "self_attention.out_proj.bias"])
        h = F.linear(site(f"{layer}.fc1_in", compensated(f"{layer}.ln_2", partial(_layer_norm, sd, p + "ln_2"), x)),
                     sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"])
        h = site(f"{layer}.fc2_in", compensated(f"{layer}.gelu", F.gelu, h))
        x = x + F.linear(h, sd[p + "mlp.3.weight"], sd[p + "mlp.3.bias"])
    x = site("head_in", compensated("ln", partial(_layer_norm, sd, "encoder.ln"), x)[:, 0])
    return F.linear(x, sd["heads.head.weight"], sd["heads.head.bias"])


def site_moments(sd: dict, heads: int, batches) -> dict[str, tuple[float, float]]:
    """Mean and population standard deviation of each site's input over the ANN's batches."""
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name, x):
        seen.setdefault(name, []).append(x)
        return x
    for images in batches:
        forward(sd, heads, images, record, lambda name, f, *xs: f(*xs))
    return moments(seen)


def simulate(sd: dict, heads: int, images: torch.Tensor, lams: dict[str, float], n: int, T: int,
             communicate: bool) -> torch.Tensor:
    """The SNN's logits at each of T steps, ``[T, B, classes]``."""
    membranes, sums, previous = {}, {}, {}

    def site(name, x):
        lam = lams[name]
        v_pos, v_neg = membranes.get(name, (torch.full_like(x, lam / 2), torch.full_like(x, lam / 2)))
        out_pos, v_pos, _ = basal_fire(v_pos, x, lam, n)
        out_neg, v_neg, _ = basal_fire(v_neg, -x, lam, n)
        if communicate:  # eq. 21
            v_pos, v_neg = v_pos + out_neg, v_neg + out_pos
        membranes[name] = v_pos, v_neg
        return out_pos - out_neg

    def compensated(name, f, *xs):
        sums[name] = [s + x for s, x in zip(sums[name], xs)] if name in sums else list(xs)
        now = step * f(*(s / step for s in sums[name]))
        out = now - previous.get(name, 0)
        previous[name] = now
        return out
    steps = []
    for step in range(1, T + 1):
        steps.append(forward(sd, heads, images, site, compensated))
    return torch.stack(steps)
