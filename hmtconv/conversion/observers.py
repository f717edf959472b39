"""Streaming, mergeable statistics of one activation site (input of a future spiking neuron).

Everything lives in float64/int64 buffers, so ``state_dict`` carries the calibration and two
observers (two data shards, two processes) combine with :meth:`ActivationObserver.merge`
(Chan et al.'s parallel variance, to float64 rounding; histograms and maxima add up exactly).
Memory is independent of the calibration set's size. Quantiles come from one fixed-range log2
histogram of the whole calibration set (histograms.py), never from an average of per-batch
quantiles.
"""
from __future__ import annotations

import torch
from torch import nn

from ..device import KeepsDtype
from . import observer_kernel
from .histograms import HistogramConfig


def channel_dim(ndim: int, channels_first: bool = False) -> int:
    """Channel axis: dim 1 of conv activations ``[B, C, *spatial]`` and ``[B, C]``, the last dim of
    token activations ``[B, tokens, C]``; 3-d activations are tokens unless ``channels_first``
    (``[B, C, L]``: prepare finds it from the layer that made them, see layout.py)."""
    return ndim - 1 if ndim == 3 and not channels_first else 1


def lam_shape(shape: torch.Size, channels_first: bool = False) -> tuple[int, ...]:
    """Shape of a per-channel threshold that broadcasts to one step of activations ``shape``
    (``shape`` includes the batch dim)."""
    dim = channel_dim(len(shape), channels_first)
    return (shape[dim],) + (1,) * (len(shape) - 1 - dim)


class MissingHistograms(ValueError):
    """A policy read the histograms of an observer prepared without them (``histogram=None``)."""


def check_finite(observers: list["ActivationObserver"]) -> None:
    """Raise the error about non-finite activations that ``forward`` defers off the CPU, naming the
    first of ``observers`` (in run order) that saw them; one read of the device for all of them."""
    pending = [obs for obs in observers if obs.unchecked is not None]
    flags = [obs.unchecked for obs in pending]
    for obs in pending:
        obs.unchecked = None
    if flags and not torch.stack(flags).all():
        for obs, finite in zip(pending, flags):
            obs._raise_unless(finite)


class ShapeObserver(nn.Module):
    """The per-sample shape of what it is called on, in a buffer (empty before the first call), so
    that a prepared model's ``state_dict`` carries it; the images' shape as such, and the base of
    :class:`ActivationObserver`. Buffers named in ``LAZY`` are sized by the first batch and take
    the saved size on loading."""

    LAZY: tuple[str, ...] = ("sample_shape",)

    def __init__(self):
        super().__init__()
        self.register_buffer("sample_shape", torch.zeros(0, dtype=torch.int64))
        # the buffer's value, read at every call: reading the buffer itself on a GPU waits for it
        self._shape: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The per-sample shape seen (None before any)."""
        return self._shape

    def forward(self, x: torch.Tensor) -> None:
        if self._shape is None:
            self._shape = tuple(x.shape[1:])
            self.sample_shape = torch.tensor(self._shape, dtype=torch.int64, device=self.sample_shape.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self.LAZY:
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._shape = tuple(self.sample_shape.tolist()) if self.sample_shape.numel() else None


class ActivationObserver(ShapeObserver, KeepsDtype):
    """Count, mean and M2 (Welford/Chan) of the input ``x``, per layer and per channel; maximum and
    histograms of the output activation ``relu(x)`` (unsigned site: the ReLU's output) or ``|x|``
    (signed site: both halves of y = x share one threshold) for the percentile policies.

    The histograms are ``hist_channel`` ``[C, bins]`` or, with ``HistogramConfig(per_channel=False)``,
    ``hist_layer`` ``[bins]`` (the other buffer empty); read them with :meth:`histogram`, which
    gives the layer's counts either way (the sum of the channels'). ``hist=None`` keeps none (both
    empty): moments and maxima only, for the policies that read nothing else (opt, opt1500, max)."""

    LAZY = ("ch_count", "ch_mean", "ch_m2", "ch_max", "hist_channel", "hist_layer", "sample_shape")
    KEEP_DTYPE = ("count", "mean", "m2", "max", "ch_count", "ch_mean", "ch_m2", "ch_max")

    def __init__(self, signed: bool, hist: HistogramConfig | None = HistogramConfig(), channels_first: bool = False):
        super().__init__()
        self.signed = signed
        self.hist = hist
        self.channels_first = channels_first  # of 3-d activations (see channel_dim)
        f64 = dict(dtype=torch.float64)
        for name in ("count", "mean", "m2", "max"):  # per layer
            self.register_buffer(name, torch.zeros((), **f64))
        # With per-channel histograms the layer's counts are their sum (each value is counted once),
        # so the layer's own histogram is kept only without them.
        layer_bins = 0 if hist is None or hist.per_channel else hist.bins
        self.register_buffer("hist_layer", torch.zeros(layer_bins, dtype=torch.int64))
        # Per-channel buffers are sized on the first batch (the channel count is unknown before).
        for name in ("ch_count", "ch_mean", "ch_m2", "ch_max"):
            self.register_buffer(name, torch.zeros(0, **f64))
        self.register_buffer("hist_channel", torch.zeros(0, 0 if hist is None else hist.bins, dtype=torch.int64))
        self.max.fill_(-torch.inf)
        self.label = "a site"  # its qualified name, for errors (calibrate sets it)
        # off the CPU, whether the batches since the last check_finite were finite (a 0-d bool
        # tensor): reading it at every call would stall the device once per site and batch
        self.unchecked: torch.Tensor | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # histograms of other bins (or none) would be read, or counted into, past their end
        saved = [state_dict.get(prefix + name) for name in ("hist_channel", "hist_layer")]
        if all(isinstance(t, torch.Tensor) for t in saved):
            bins = 0 if self.hist is None else self.hist.bins
            per_channel = self.hist is not None and self.hist.per_channel
            channel, layer = saved  # as __init__ and forward size them
            fits = channel.dim() == 2 and channel.shape[1] == bins and (per_channel or channel.shape[0] == 0) \
                and layer.shape == (0 if per_channel else bins,)
            if not fits:
                raise ValueError(f"{prefix.rstrip('.') or 'observer'}: the saved statistics hold histograms of shape "
                                 f"{list(channel.shape)} per channel and {list(layer.shape)} per layer, but this "
                                 f"observer was prepared with histogram={self.hist!r}; prepare with the histogram "
                                 f"setting of the saved calibration")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- gathering ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"{self.label} expects a batched activation [B, features...], got shape "
                             f"{tuple(x.shape)}: keep a feature dim there (x.unsqueeze(1) before the ReLU)")
        if self.shape is None:
            super().forward(x)
            dev = self.count.device
            channels = x.shape[channel_dim(x.dim(), self.channels_first)]
            self.ch_count = torch.zeros(channels, dtype=torch.float64, device=dev)
            self.ch_mean, self.ch_m2 = torch.zeros_like(self.ch_count), torch.zeros_like(self.ch_count)
            self.ch_max = torch.full_like(self.ch_count, -torch.inf)
            if self.hist is not None and self.hist.per_channel:
                self.hist_channel = torch.zeros(channels, self.hist.bins, dtype=torch.int64, device=dev)
        elif tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{self.label} saw per-sample shape {tuple(x.shape[1:])} after {self.shape}: either "
                             f"the calibration images differ in size (calibrate with images of one size), or fx "
                             f"could not trace the model and one module is called on activations of several "
                             f"sizes (torchvision's Bottleneck reuses self.relu): prepare gives it a site per "
                             f"call that a zero image of example_inputs' size makes; where that does not show the "
                             f"calls, give each call a module of its own")
        dim = channel_dim(x.dim(), self.channels_first)
        x = x.detach().to(self.count.device)
        counts = None if self.hist is None else self.hist_channel if self.hist.per_channel else self.hist_layer
        layer = [self.count, self.mean, self.m2, self.max]
        channel = [self.ch_count, self.ch_mean, self.ch_m2, self.ch_max]
        merged = observer_kernel.observe_batch(x, dim, self.signed, self.hist, layer, channel, counts)
        if merged is None:  # the tensor path
            others = tuple(d for d in range(x.dim()) if d != dim)
            merged = self._merge_batch(x, others, float(x.numel() // x.shape[dim]))
            if self.hist is not None:
                self._add_histograms(self._output(x), dim, merged)
        if isinstance(merged, bool) or merged.is_cpu:  # (a read that costs nothing)
            self._raise_unless(merged)
        else:
            self.unchecked = merged if self.unchecked is None else self.unchecked & merged

    def _raise_unless(self, finite) -> None:
        if not finite:  # any NaN or inf would poison the statistics (and thresholds) for good
            raise ValueError(f"NaN or inf in the activations entering {self.label} during calibration (finite "
                             f"input images): a layer before it overflows or has non-finite weights")

    def _merge_batch(self, x: torch.Tensor, others: tuple[int, ...], rows: float) -> torch.Tensor:
        """Moments in float64 (one fused pass, in the activation's own layout); the layer's follow
        from the channels' by Chan's merge (every channel has the same count). Returns whether
        ``x`` was finite (a 0-d bool tensor, not read here); merges nothing where it was not."""
        ch_var, ch_mean = torch.var_mean(x.to(torch.float64), dim=others, correction=0)
        finite = torch.isfinite(ch_var).all()  # any NaN or inf makes its channel's variance NaN
        ch_m2 = ch_var * rows
        ch_max = self._output(x).amax(others).to(torch.float64)  # max needs no float64
        layer_mean = ch_mean.mean()
        layer_m2 = ch_m2.sum() + rows * ((ch_mean - layer_mean) ** 2).sum()
        self._merge_moments("", rows * ch_mean.numel(), layer_mean, layer_m2, ch_max.max(), finite)
        self._merge_moments("ch_", torch.full_like(ch_mean, rows), ch_mean, ch_m2, ch_max, finite)
        return finite

    def _merge_moments(self, prefix: str, n_b, mean_b, m2_b, max_b, finite: torch.Tensor | None = None) -> None:
        """Chan et al.'s pairwise update of (count, mean, M2): any merge order gives the same
        moments up to float64 rounding (about 1e-15 relative). Where ``finite`` is false
        everything keeps its value."""
        n_a, mean_a, m2_a, max_a = (getattr(self, prefix + k) for k in ("count", "mean", "m2", "max"))
        n = n_a + n_b
        delta = mean_b - mean_a
        new = {"mean": mean_a + delta * (n_b / n), "m2": m2_a + m2_b + delta**2 * (n_a * n_b / n), "count": n,
               "max": torch.maximum(max_a, max_b)}
        for k, value in new.items():
            kept = getattr(self, prefix + k)
            setattr(self, prefix + k, value if finite is None else torch.where(finite, value, kept))

    def _output(self, xc: torch.Tensor) -> torch.Tensor:
        return xc.abs() if self.signed else xc.clamp_min(0)

    def _add_histograms(self, out: torch.Tensor, dim: int, finite: torch.Tensor) -> None:
        """Count the output activation ``out`` into the per-channel histograms, or the layer's
        where those are not kept; nothing where ``finite`` is false. (``index_add_``, not
        ``bincount``: on CUDA that reads the indices' min and max back, twice waiting for the device.)"""
        idx = self.hist.bin_index(out)
        if self.hist.per_channel:
            channels = out.shape[dim]
            offset = torch.arange(channels, device=idx.device) * self.hist.bins
            idx += offset.view([channels if d == dim else 1 for d in range(idx.dim())])
        counts = self.hist_channel.view(-1) if self.hist.per_channel else self.hist_layer
        counts.index_add_(0, idx.flatten(), finite.to(counts.dtype).expand(idx.numel()))

    @torch.no_grad()
    def merge(self, other: "ActivationObserver") -> "ActivationObserver":
        """Fold ``other``'s statistics into this observer (same site, another data shard)."""
        mine, theirs = (self.signed, self.hist, self.channels_first), (other.signed, other.hist, other.channels_first)
        if mine != theirs:  # histograms of other bins (or |x| against relu(x)) would add up meaninglessly
            raise ValueError(f"{self.label}: cannot merge an observer with (signed, histogram, channels_first) = "
                             f"{theirs} into one with {mine}")
        if other.count == 0:
            return self
        if self.shape is not None and other.shape != self.shape:  # as forward refuses a second shape
            raise ValueError(f"{self.label}: cannot merge statistics of per-sample shape {other.shape} into "
                             f"those of {self.shape} (calibrate every shard with inputs of one size)")
        if self.shape is None:
            self.load_state_dict(other.state_dict())
            return self
        self._merge_moments("", other.count, other.mean, other.m2, other.max)
        self._merge_moments("ch_", other.ch_count, other.ch_mean, other.ch_m2, other.ch_max)
        self.hist_layer += other.hist_layer
        self.hist_channel += other.hist_channel
        return self

    # -- reading -----------------------------------------------------------------------------
    def _check(self) -> None:
        if self.count == 0:
            raise RuntimeError("observer has no data: run hmtconv.calibrate(prepared, loader) first")

    def moments(self, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and population standard deviation of the site's input x (Algorithm 1, line 3)."""
        self._check()
        if per_channel:
            return self.ch_mean, (self.ch_m2 / self.ch_count).sqrt()
        return self.mean, (self.m2 / self.count).sqrt()

    def maximum(self, per_channel: bool) -> torch.Tensor:
        """Maximum of the site's output activation (``relu(x)`` or ``|x|``)."""
        self._check()
        return self.ch_max if per_channel else self.max

    def histogram(self, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(counts [C or 1, bins], lower edges, upper edges)`` of the output activation; bin 0 is
        ``[0, 2**min_exp)`` and the open last bin is closed at the largest value seen."""
        counts = self._counts(per_channel)
        k = torch.arange(self.hist.bins, dtype=torch.float64)
        hi = torch.exp2(self.hist.min_exp + k / self.hist.bins_per_octave)
        lo = torch.cat((torch.zeros(1, dtype=torch.float64), hi[:-1]))
        hi[-1] = max(float(self.max), float(lo[-1]))
        return (counts if per_channel else counts.unsqueeze(0)).cpu(), lo, hi

    def _counts(self, per_channel: bool) -> torch.Tensor:
        """The histogram counts: ``[C, bins]`` per channel, ``[bins]`` for the layer."""
        self._check()
        if self.hist is None:
            raise MissingHistograms(f"{self.label}: calibrated without histograms (prepare(..., histogram=None), "
                                    f"as convert(model, loader, policy=...) does for policies that read only "
                                    f"moments and maxima); percentile policies and opt-emp need prepare(model, "
                                    f"histogram=HistogramConfig()) and calibrate")
        if per_channel and not self.hist.per_channel:
            raise ValueError("per-channel histograms and percentiles need "
                             "prepare(..., histogram=HistogramConfig(per_channel=True))")
        if per_channel:
            return self.hist_channel
        return self.hist_channel.sum(0) if self.hist.per_channel else self.hist_layer

    def quantile(self, q: float, per_channel: bool) -> torch.Tensor:
        """``q``-quantile of the site's output activation over the whole calibration set."""
        hist = self._counts(per_channel).to(torch.float64)
        cdf = hist.cumsum(-1)
        target = (q * cdf[..., -1:]).clamp_min(0.5)  # at least one sample below the quantile
        b = torch.searchsorted(cdf, target).clamp_max(self.hist.bins - 1)
        below = torch.where(b > 0, cdf.gather(-1, (b - 1).clamp_min(0)), torch.zeros_like(target))
        inside = hist.gather(-1, b).clamp_min(1)
        frac = ((target - below) / inside).clamp(0, 1)
        # Geometric interpolation inside bin b = [2**(lo), 2**(lo + 1/bpo)); bin 0 is [0, 2**min_exp),
        # linear. A bin ends at the largest value seen where that lies inside it (the open last bin
        # always), so no quantile exceeds the maximum.
        lo = self.hist.min_exp + (b.to(torch.float64) - 1) / self.hist.bins_per_octave
        top = self.maximum(per_channel).to(torch.float64).reshape(b.shape)
        hi = torch.where(b == self.hist.bins - 1, top,
                         torch.minimum(torch.exp2(lo + 1 / self.hist.bins_per_octave), top))
        value = torch.exp2(lo) * (hi / torch.exp2(lo)).clamp_min(1.0) ** frac
        value = torch.where(b == 0, frac * hi, value)
        return value.squeeze(-1)

