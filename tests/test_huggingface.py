"""Hugging Face ``transformers`` image classifiers convert as they are: their ``ModelOutput`` is
read for its logits, and their ``pixel_values.dtype`` check is answered while tracing."""
import pytest
import torch
import transformers as tf
from torch import nn

import hmtconv.conversion as hc
from test_convert_models import approaches_its_ann, loader

TINY = dict(image_size=12, patch_size=4, num_channels=2, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, num_labels=5)
MODELS = {
    "vit": lambda: tf.ViTForImageClassification(tf.ViTConfig(**TINY)),
    "deit": lambda: tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**TINY)),
    "convnext": lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(
        num_channels=2, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)),
    "resnet": lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
        num_channels=2, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_hugging_face_classifiers_convert_and_approach_their_ann(name):
    torch.manual_seed(0)
    model, data = MODELS[name]().eval(), loader((2, 12, 12), classes=5)
    snn = approaches_its_ann(model, data)
    children = dict(model.named_children())  # site names are the model's own (no wrapper's prefix)
    assert all(name.split(".")[0].removesuffix("_in") in children for name in snn.sites())
    result = hc.evaluate(snn, data, ann=model)  # the ANN's ModelOutput read for its logits
    images, labels = map(torch.cat, zip(*data))
    assert result.ann_accuracy == 100 * (model(images).logits.argmax(-1) == labels).float().mean().item()


def test_convnext_v2_global_response_normalization_is_compensated():
    """GRN takes torch.linalg.vector_norm of spikes over the image (was refused as neither linear
    nor registered): a compensated VectorNorm, then a compensated quotient and product."""
    torch.manual_seed(0)
    model = tf.ConvNextV2ForImageClassification(tf.ConvNextV2Config(
        num_channels=2, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)).eval()
    for name, p in model.named_parameters():
        if ".grn." in name:  # zeros as initialized: GRN an identity
            nn.init.normal_(p, std=0.5)
    snn = approaches_its_ann(model, loader((2, 12, 12), classes=5))
    kinds = [type(m.module).__name__ for m in snn.modules() if isinstance(m, hc.compensated.Compensated)]
    assert kinds.count("VectorNorm") == 2 and kinds.count("Divide") == 2


PERCEIVER = dict(image_size=8, num_latents=4, d_latents=16, d_model=16, num_blocks=1, num_self_attends_per_block=1,
                 num_self_attention_heads=2, num_cross_attention_heads=1, num_labels=5)


@pytest.mark.filterwarnings("ignore:constant activations")  # random weights: near-uniform cross-attention
@pytest.mark.parametrize("kind", ["Learned", "Fourier", "ConvProcessing"])
def test_perceiver_traces_at_the_image_size_and_converts(kind):
    """Perceiver's forward, traced at the image size, computes np.prod of sizes, builds
    nn.Softmax() in forward, calls a self-attention's nn.Identity() on None and tests the result
    against None, concatenates a symbolic batch and a shape, indexes its attention mask with
    arange over the batch and takes row 0 of position features expanded over the batch
    (all fell back to module swapping, or were refused as moving rows across the time steps)."""
    torch.manual_seed(0)
    model = getattr(tf, f"PerceiverForImageClassification{kind}")(tf.PerceiverConfig(**PERCEIVER)).eval()
    approaches_its_ann(model, loader((3, 8, 8), classes=5))


def test_a_hugging_face_classifier_without_logits_converts():
    """PP-LCNet's classifier returns its head's output as ``last_hidden_state`` (no ``logits``:
    prepare's forward raised AttributeError): the SNN returns the first field, as for a tuple."""
    torch.manual_seed(0)
    blocks = [[[3, 8, 8, 1, False]], [[3, 8, 8, 2, False]], [[3, 8, 16, 1, False]], [[3, 16, 16, 2, False]],
              [[5, 16, 16, 1, True]]]  # one (kernel, in, out, stride, squeeze-excitation) block per stage
    model = tf.PPLCNetForImageClassification(tf.PPLCNetConfig(block_configs=blocks, stem_channels=8, class_expand=16,
                                                              num_labels=5)).eval()
    for name, p in model.named_parameters():  # as initialized (std 0.02), logits ~ 1e-44
        if p.dim() > 1:
            nn.init.kaiming_normal_(p)
        elif name.endswith("normalization.weight"):
            nn.init.ones_(p)
    data = loader((3, 16, 16), classes=5)
    snn = hc.convert(model, data, n=8, T=4, policy="max", identity="all")
    assert snn.report.traced and snn.report.unconverted == []
    torch.testing.assert_close(snn.ann_forward(data[0][0]), model(data[0][0]).last_hidden_state, rtol=1e-4, atol=0)
    result = hc.evaluate(snn, data, ann=model)
    images, labels = map(torch.cat, zip(*data))
    expected = (model(images).last_hidden_state.argmax(-1) == labels).float().mean().item()
    assert result.ann_accuracy == 100 * expected


def test_a_hugging_face_model_returning_tuples_converts_too():
    torch.manual_seed(0)
    model = MODELS["resnet"]().eval()
    model.config.return_dict = False
    data = loader((2, 12, 12), classes=5)
    snn = hc.convert(model, data, n=8, T=4, policy="max")
    torch.testing.assert_close(snn.ann_forward(data[0][0]), model(data[0][0])[0])


def test_the_cli_loads_a_saved_hugging_face_classifier_with_its_image_processor(tmp_path, capsys):
    import json

    from hmtconv.cli import main

    torch.manual_seed(0)
    saved = tmp_path / "vit"
    tf.ViTForImageClassification(tf.ViTConfig(**{**TINY, "image_size": 28, "patch_size": 7, "num_channels": 1,
                                                 "num_labels": 10})).save_pretrained(saved)
    tf.ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.5], image_std=[0.5]).save_pretrained(saved)
    out = tmp_path / "out.json"
    small = ["--dataset", "mnist", "--limit", "32", "--calib-size", "16", "--T", "2", "--identity", "all",
             "--no-progress"]
    assert main(["evaluate", "--model", f"hf:{saved}", *small, "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["model"] == f"Hugging Face {saved}" and len(record["snn_accuracy"]) == 2
    assert main(["evaluate", "--model", f"hf:{tmp_path / 'absent'}", *small]) == 2
    assert "no such directory" in capsys.readouterr().err
