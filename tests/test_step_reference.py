"""The time-folded SNN (all T steps at once on ``[T*B, ...]``) against the same network simulated
literally one step at a time on ``[B, ...]`` (step_reference.py): per-step outputs, spikes per
site and step, what ``evaluate`` ranks and counts, and samples that do not interact."""
import functools

import pytest
import timm
import torch
import torchvision
import transformers as tf
from torch import nn
from torch.nn import functional as F
from torchvision.models import swin_transformer as swin

import hmtconv
from step_reference import run_steps
from test_convert_functional import HandAttention, TorchTransformer
from test_convert_models import Untraceable

pytestmark = pytest.mark.filterwarnings("ignore:constant activations", "ignore:.*outside.*histogram")


def images(shape, batch=3, seed=0, dtype=torch.float64, classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (batch,), generator=g)


def calibration(shape, dtype=torch.float64):
    return [images(shape, batch=4, seed=seed, dtype=dtype) for seed in (1, 2)]


def assert_same_steps(snn, x, steps=None):
    """Per-step outputs of the fast SNN equal the literal simulation's (float64: to rounding; float32:
    the same bits in practice, a tolerance for batch-size-dependent BLAS rounding), and so do the
    spikes of every site at every step; both simulations are not trivial (spikes, outputs that vary)."""
    steps = steps or snn.config.T
    fast = snn(x, steps)
    spikes_fast = {name: site.neuron.spikes for name, site in snn.sites().items()}
    ref, spikes_ref, _ = run_steps(snn, x, steps)
    scale = ref.abs().max()
    tol = (1e-10 if x.dtype == torch.float64 else 1e-5) * scale
    assert fast.shape == ref.shape and (fast - ref).abs().max() <= tol, (fast - ref).abs().max()
    assert spikes_ref.keys() == spikes_fast.keys()
    for name, counts in spikes_ref.items():  # (a site called twice: its neuron keeps the last call's)
        assert torch.equal(spikes_fast[name], counts[-1]), name
    assert sum(c.sum() for c in spikes_ref.values()) > 0 and scale > 0
    if steps > 1:
        assert not torch.allclose(ref[0], ref[-1])


def assert_samples_apart(snn, x):
    """Sample i's outputs at every step do not depend on the other samples of the batch."""
    together = snn(x)
    for i in range(x.shape[0]):
        alone = snn(x[i:i + 1])
        assert (alone[:, 0] - together[:, i]).abs().max() <= 1e-10 * together.abs().max(), i


def he_init(model):
    """He-initialized Conv/Linear weights: random models whose activations neither vanish nor saturate."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, std=(2 / m.weight[0].numel()) ** 0.5)
    return model


def torchvision_vit():
    torch.manual_seed(0)
    return he_init(torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2,
                                                       hidden_dim=32, mlp_dim=64, num_classes=10))


@functools.cache
def calibrated_vit(identity):
    vit = torchvision_vit().double().eval()
    return hmtconv.calibrate(hmtconv.prepare(vit, identity=identity), calibration((3, 28, 28)))


@pytest.mark.parametrize("granularity", ["layer", "channel"])
@pytest.mark.parametrize("communicate", [True, False])
@pytest.mark.parametrize("identity", ["all", "linear"])
def test_torchvision_vit_equals_its_step_by_step_simulation(identity, communicate, granularity):
    """Class token expanded to the batch and picked by x[:, 0], heads split and merged, the matmuls'
    operands spiking (all) or compensated (linear); batch 1 and 3, n = 1 and 4, T = 1, 3, 8."""
    x, _ = images((3, 28, 28))
    for n, T, policy in ((1, 3, "999"), (4, 8, "opt"), (4, 1, "max")):
        snn = hmtconv.convert(calibrated_vit(identity), n=n, T=T, policy=policy, identity=identity,
                              communicate=communicate, granularity=granularity)
        assert_same_steps(snn, x)
        assert_same_steps(snn, x[:1])
    assert_samples_apart(snn, x)


def timm_vit(**kwargs):
    torch.manual_seed(0)
    return he_init(timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                                                 mlp_ratio=2, num_classes=10, **kwargs))


def timm_deit_distilled():
    torch.manual_seed(0)
    return he_init(timm.models.deit.VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                               num_heads=2, mlp_ratio=2, num_classes=10))


def timm_swin():
    torch.manual_seed(0)
    return he_init(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                                     window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2), num_classes=10))


def torchvision_swin(v2):
    """Two stages, 9 x 9 tokens at 36 px (padded windows, shifted with the mask), then one window."""
    torch.manual_seed(0)
    extra = dict(block=swin.SwinTransformerBlockV2, downsample_layer=swin.PatchMergingV2) if v2 else {}
    return he_init(swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                        window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=10, **extra))


HF_TINY = dict(image_size=12, patch_size=4, num_channels=2, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32, num_labels=5)


def hugging_face(cls, config):
    torch.manual_seed(0)
    return he_init(cls(config))


class SqueezeExcite(nn.Module):
    """Max pooling of a neuron's output that is read elsewhere too (it cannot move before the
    neuron: compensated), a squeeze-and-excitation gate (a compensated sigmoid and product of two
    spike trains), average pooling and a spatial mean."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.squeeze, self.excite = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.pool, self.head = nn.MaxPool2d(2), nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h2 = F.relu(self.c2(self.pool(h))) + F.avg_pool2d(h, 2)
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(h2.mean((2, 3), keepdim=True)))))
        return self.head(self.pool(h2 * gate).flatten(1))


class LeNet(nn.Module):
    """``h.view(x.size(0), -1)``: a batch size read from the input, used after the neurons."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 8, 5), nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        return self.fc(F.max_pool2d(F.relu(self.c2(h)), 2).view(x.size(0), -1))


def seeded(cls, *args):
    torch.manual_seed(0)
    return he_init(cls(*args))


# name -> (model builder, input shape, convert options)
MODELS = {
    "timm_vit": (timm_vit, (3, 32, 32), dict(identity="all")),
    "timm_vit_avg_no_class_token": (lambda: timm_vit(global_pool="avg", class_token=False), (3, 32, 32),
                                    dict(identity="all", granularity="channel", communicate=False)),
    "timm_deit_distilled": (timm_deit_distilled, (3, 32, 32), dict(identity="linear")),
    "timm_swin": (timm_swin, (3, 32, 32), dict(identity="all", granularity="channel")),
    "torchvision_swin": (lambda: torchvision_swin(False), (3, 36, 36), dict(identity="all")),
    "torchvision_swin_v2": (lambda: torchvision_swin(True), (3, 36, 36), dict(identity="all", communicate=False)),
    "hand_sdpa_bool_mask": (lambda: seeded(HandAttention, None, "bool"), (5, 6), dict(identity="all")),
    "hand_sdpa_float_mask": (lambda: seeded(HandAttention, 0.3, "float"), (5, 6), dict(identity="all")),
    "hand_sdpa_causal": (lambda: seeded(HandAttention, None, "causal"), (5, 6), dict(identity="linear")),
    "torch_transformer_encoder": (lambda: seeded(TorchTransformer, True), (5, 6), dict(identity="all")),
    "hf_vit": (lambda: hugging_face(tf.ViTForImageClassification, tf.ViTConfig(**HF_TINY)), (2, 12, 12),
               dict(identity="all")),
    "hf_deit_with_teacher": (lambda: hugging_face(tf.DeiTForImageClassificationWithTeacher, tf.DeiTConfig(**HF_TINY)),
                             (2, 12, 12), dict(identity="all", granularity="channel")),
    "hf_swin": (lambda: hugging_face(tf.SwinForImageClassification, tf.SwinConfig(
        image_size=16, patch_size=2, num_channels=2, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=4,
        num_labels=5)), (2, 16, 16), dict(identity="all")),
    "squeeze_excite": (lambda: seeded(SqueezeExcite), (3, 16, 16), dict(identity="none", granularity="channel")),
    "squeeze_excite_maxpool_sites": (lambda: seeded(SqueezeExcite), (3, 16, 16), dict(identity="maxpool")),
    "lenet_static_prefix": (lambda: seeded(LeNet), (3, 28, 28), dict(identity="none")),
    "convnext_channels_last": (lambda: seeded(torchvision.models.convnext.ConvNeXt, [
        torchvision.models.convnext.CNBlockConfig(16, 32, 1), torchvision.models.convnext.CNBlockConfig(32, None, 1)],
        0.0, 1e-6, 10), (3, 32, 32), dict(identity="all", granularity="channel")),
    "module_swapped_shared_relu": (lambda: seeded(Untraceable, True), (6,), dict(identity="all")),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_models_equal_their_step_by_step_simulation(name):
    build, shape, options = MODELS[name]
    model = build().double().eval()
    snn = hmtconv.convert(model, calibration(shape), n=4, T=5, policy="999", **options)
    assert snn.report.unconverted == []
    x, _ = images(shape)
    assert_same_steps(snn, x)
    assert_same_steps(snn, x[1:2], steps=2)  # (simulated for fewer steps than converted for)
    assert_samples_apart(snn, x)


@pytest.mark.parametrize("name", ["timm_vit", "torchvision_swin", "squeeze_excite"])
def test_float32_kernels_equal_the_step_by_step_simulation(name):
    """float32 on CPU runs the compiled neuron and compensation kernels (float64 the tensor paths)."""
    build, shape, options = MODELS[name]
    snn = hmtconv.convert(build().eval(), calibration(shape, torch.float32), n=4, T=6, policy="999", **options)
    assert_same_steps(snn, images(shape, dtype=torch.float32)[0])


@pytest.mark.parametrize("name", ["vit", "squeeze_excite"])
def test_evaluate_ranks_and_counts_what_the_step_by_step_simulation_gives(name):
    """Accuracy at every t (argmax of the mean logits of steps 1..t), spikes per sample up to every
    t and per-site firing rates, over two batches simulated in chunks of 2 samples."""
    build, shape, options = (torchvision_vit, (3, 28, 28), dict(identity="all")) if name == "vit" else MODELS[name][:3]
    model, T = build().double().eval(), 6
    snn = hmtconv.convert(model, calibration(shape), n=1, T=T, policy="999", **options)
    # labels: the first step's ranking, so that the accuracy changes with t where the ranking does
    runs = [run_steps(snn, images(shape, batch=5, seed=seed)[0], T) for seed in (10, 11)]
    mean_logits = [out.cumsum(0) / torch.arange(1, T + 1, dtype=out.dtype).view(T, 1, 1) for out, _, _ in runs]
    batches = [(images(shape, batch=5, seed=seed)[0], mean[0].argmax(-1)) for seed, mean in zip((10, 11), mean_logits)]
    result = hmtconv.evaluate(snn, batches, max_batch=2)  # (with the ANN-mode pass of the diagnostics between chunks)
    correct = sum((mean.argmax(-1) == y).sum(1) for mean, (_, y) in zip(mean_logits, batches))
    assert result.snn_accuracy == (100 * correct / 10).tolist() and result.snn_accuracy[-1] < 100
    spikes = sum(c.sum(0) for _, counts, _ in runs for c in counts.values())
    torch.testing.assert_close(torch.tensor(result.spikes_cumulative, dtype=torch.float64), spikes.cumsum(0) / 10)
    assert sorted(layer.name for layer in result.per_layer) == sorted(runs[0][1])
    for layer in result.per_layer:
        site_spikes = sum(counts[layer.name].sum().item() for _, counts, _ in runs)
        site_elements = sum(sum(elements[layer.name]) * 5 for _, _, elements in runs)
        assert layer.firing_rate == pytest.approx(site_spikes / (site_elements * T), rel=1e-12)
