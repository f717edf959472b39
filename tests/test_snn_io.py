"""Saving and loading converted SNNs (safetensors + JSON, no pickle): bit-identical outputs and
clear errors for truncated, corrupted, foreign, newer and other-model files."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import hmtconv.conversion as hc
from hmtconv.cli import main
from hmtconv.errors import UserError
from hmtconv.models import MODELS
from hmtconv.models.loading import load_model
from hmtconv.snn_io import FORMAT, load_snn, save_snn


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 10)).eval()


def images(shape=(1, 8, 8), batches=2, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(batches)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A per-channel, identity='maxpool' SNN of a pickled CNN, saved: (snn, path, model file)."""
    root = tmp_path_factory.mktemp("snn")
    model_file = root / "cnn.pt"
    torch.save(small_cnn(), model_file)
    snn = hc.convert(small_cnn(), images(), T=3, granularity="channel", identity="maxpool")
    path = save_snn(snn, root / "cnn.safetensors", model=str(model_file), num_classes=10)
    return snn, path, model_file


def rewrite(src, dst, tensors=None, meta=None):
    with safe_open(str(src), framework="pt") as f:
        old_meta = json.loads(f.metadata()[FORMAT])
        old_tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors or old_tensors, str(dst), metadata={FORMAT: json.dumps({**old_meta, **(meta or {})})})
    return dst


def test_cnn_roundtrip_is_bit_identical_with_per_channel_thresholds_and_maxpool_sites(saved):
    snn, path, _ = saved
    loaded, meta = load_snn(path)
    assert meta["config"]["granularity"] == "channel" and meta["config"]["identity"] == "maxpool"
    assert any(site.signed for site in loaded.sites().values())  # the y = x sites of moved max pooling
    assert all(site.neuron.lam.numel() > 1 for site in loaded.sites().values())
    x = images(seed=5)[0][0]
    assert torch.equal(loaded(x), snn(x))
    assert hc.evaluate(loaded, images(seed=5)).to_dict() == hc.evaluate(snn, images(seed=5)).to_dict()


def test_resnet_roundtrip_is_bit_identical(tmp_path):
    torch.manual_seed(1)  # other weights than the rebuilt model's: they must come from the file
    model = MODELS["resnet18_small"](in_channels=1, num_classes=10, image_size=8).eval()
    data = images(batches=1)
    snn = hc.convert(model, data, T=2, policy="999,*layer1.*=opt")  # per-site policies travel too
    loaded, meta = load_snn(save_snn(snn, tmp_path / "r.safetensors", model="resnet18_small", num_classes=10))
    assert meta["config"]["policy"] == "999,*layer1.*=opt"
    assert torch.equal(loaded(data[0][0]), snn(data[0][0]))


def test_float64_snn_of_a_model_built_in_float32_roundtrips_in_float64(tmp_path):
    """A built-in name rebuilds a float32 model: the file's float64 tensors must not be cast into it."""
    torch.manual_seed(2)
    model = MODELS["vgg_small"](in_channels=1, num_classes=10, image_size=8).eval().double()
    data = [(x.double(), y) for x, y in images(batches=1)]
    snn = hc.convert(model, data, T=2)
    loaded, meta = load_snn(save_snn(snn, tmp_path / "d.safetensors", model="vgg_small", num_classes=10))
    assert meta["dtype"] == "float64"
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in snn.state_dict().items()}
    assert torch.equal(loaded(data[0][0]), snn(data[0][0]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_an_snn_cast_after_conversion_roundtrips(dtype, tmp_path):
    """``snn.to(dtype)`` casts weights only: thresholds, fan-outs and energy counts keep the dtypes a
    conversion in that dtype gives them, so the file matches the SNN rebuilt in it."""
    torch.manual_seed(3)
    model = MODELS["vgg_small"](in_channels=1, num_classes=10, image_size=8).eval()
    data = images(batches=1)
    snn = hc.convert(model, data, T=2).to(dtype)
    loaded, meta = load_snn(save_snn(snn, tmp_path / "c.safetensors", model="vgg_small", num_classes=10))
    assert meta["dtype"] == str(dtype).removeprefix("torch.")
    assert torch.equal(loaded(data[0][0].to(dtype)), snn(data[0][0].to(dtype)))


@pytest.mark.filterwarnings("ignore:constant activations")
@pytest.mark.parametrize("spec,size", [("timm:deit_tiny_patch16_224", 32), ("timm:mobilevit_xxs", 64)])
def test_timm_roundtrip_with_shared_parameters_and_a_graph_traced_at_one_size(spec, size, tmp_path):
    """DeiT's LayerNorms call F.layer_norm, whose modules share the model's weights (two names,
    one tensor); MobileViT branches on sizes, so it is rebuilt by tracing at the saved size."""
    model = load_model(spec, None, in_channels=3, image_size=size, num_classes=10).model.eval()
    data = images((3, size, size), batches=1, batch=2)
    snn = hc.convert(model, data, T=2, identity="all")
    loaded, _ = load_snn(save_snn(snn, tmp_path / "t.safetensors", model=spec, num_classes=10))
    assert loaded.report.traced and torch.equal(loaded(data[0][0]), snn(data[0][0]))


def test_moved_weights_file_is_given_again_with_weights(tmp_path):
    """The rebuild reads the saved --weights path; `evaluate --snn FILE --weights NEW` must use NEW."""
    torch.manual_seed(4)
    model = MODELS["vgg_small"](in_channels=1, num_classes=10, image_size=28).eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    snn = hc.convert(model, images((1, 28, 28), batches=1), T=2)
    path = save_snn(snn, tmp_path / "s.safetensors", model="vgg_small", weights=str(tmp_path / "w.pt"), num_classes=10)
    (tmp_path / "w.pt").rename(tmp_path / "moved.pt")
    with pytest.raises(UserError, match="w.pt: no such file"):
        load_snn(path)
    x = images((1, 28, 28), seed=3)[0][0]
    assert torch.equal(load_snn(path, weights=str(tmp_path / "moved.pt"))[0](x), snn(x))
    data = ["--dataset", "mnist", "--limit", "4", "--calib-size", "4", "--batch-size", "4", "--no-diagnostics"]
    assert main(["evaluate", "--snn", str(path), "--weights", str(tmp_path / "moved.pt"), *data]) == 0


def test_the_model_references_save_snn_takes_are_those_load_model_takes(tmp_path):
    from hmtconv.models.loading import unknown_model
    (tmp_path / "m.pt").touch()
    for spec in ("resnet18", "vgg_small", "timm:resnet18", "hf:org/model", str(tmp_path / "m.pt")):
        assert unknown_model(spec) is None, spec
    assert "is not a file" in unknown_model(str(tmp_path / "missing.pt"))


def test_save_snn_refuses_what_no_one_could_load(saved, tmp_path):
    """Each was written and then failed at load (a traceback, or a misleading message)."""
    snn, _, model_file = saved
    cases = [(dict(snn=small_cnn()), TypeError, "saves what hmtconv.convert returns"),
             (dict(model=None), TypeError, "model= must name the architecture"),
             (dict(num_classes="10"), TypeError, "num_classes= must be a positive int"),
             (dict(path=tmp_path), IsADirectoryError, "is a directory"),
             (dict(extra={"x": torch.ones(1)}), TypeError, "extra= must hold JSON values"),
             (dict(model="my_cnn"), ValueError, r"'my_cnn' is not a file.*torch.save\(model, 'model.pt'\)"),
             (dict(num_classes=100), ValueError, "num_classes=100, but the SNN outputs 10 classes")]
    for change, error, message in cases:
        args = {"snn": snn, "path": tmp_path / "s.safetensors", "model": str(model_file), "num_classes": 10, **change}
        with pytest.raises(error, match=message):
            save_snn(args.pop("snn"), args.pop("path"), **args)
    assert not (tmp_path / "s.safetensors").exists()


def test_a_device_name_that_cannot_work_is_refused_before_loading(saved):
    with pytest.raises(UserError, match=r"^load_snn\(device=...\): 'gpu' is not a device name"):
        load_snn(saved[1], device="gpu")
    snn, _ = load_snn(saved[1], device=torch.device("cpu"))
    assert next(snn.parameters()).device.type == "cpu"


def test_truncated_file_is_a_clear_error(saved, tmp_path):
    data = saved[1].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable SNN file"):
        load_snn(tmp_path / "cut.safetensors")


def test_flipped_bytes_in_the_tensors_are_caught_by_the_checksum(saved, tmp_path):
    data = bytearray(saved[1].read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupted"):
        load_snn(tmp_path / "bad.safetensors")


def test_newer_format_version_is_refused(saved, tmp_path):
    path = rewrite(saved[1], tmp_path / "v2.safetensors", meta={"version": 2})
    with pytest.raises(UserError, match="format version 2"):
        load_snn(path)


@pytest.mark.parametrize("drop, named", [("input_shape", "input_shape"), ("identity", "config.identity")])
def test_a_description_lacking_what_loading_reads_is_a_clear_error(saved, tmp_path, drop, named):
    with safe_open(str(saved[1]), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()[FORMAT]), {k: f.get_tensor(k) for k in f.keys()}
    (meta["config"] if drop in meta["config"] else meta).pop(drop)
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata={FORMAT: json.dumps(meta)})
    with pytest.raises(UserError, match=f"lacks {named} \\(edited by hand"):
        load_snn(tmp_path / "edited.safetensors")


def test_snn_file_given_as_model_names_snn(saved, tmp_path):
    renamed = tmp_path / "snn.pt"  # (convert --out x.pt: read as a PyTorch file, "invalid load key")
    renamed.write_bytes(saved[1].read_bytes())
    for path in (saved[1], renamed):
        with pytest.raises(UserError, match="is an SNN saved by `hmtconv convert`: pass it as --snn"):
            load_model(str(path), None, in_channels=1, image_size=8, num_classes=10)


def test_a_checkpoint_or_a_folder_given_as_the_snn_is_named_as_such(saved, tmp_path):
    with pytest.raises(UserError, match=r"cnn.pt is a PyTorch file \(a training checkpoint or a model\?\), not an "
                       "SNN file: pass it as --model"):
        load_snn(saved[2])
    with pytest.raises(UserError, match="is a directory; give the file"):
        load_snn(tmp_path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="not an SNN saved by `hmtconv convert`"):
        load_snn(tmp_path / "w.safetensors")


def test_file_for_another_model_is_refused(saved, tmp_path):
    other = tmp_path / "other.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval(), other)
    with pytest.raises(UserError, match="different model"):
        load_snn(saved[1], model=str(other))


def test_a_model_with_the_same_tensors_but_other_layers_loads_with_a_warning(saved, tmp_path, recwarn):
    """Tensors alike, structure not: a reflect-padded first conv and a ReLU6 (the saved structure
    digest differs); the unchanged model loads without that warning."""
    load_snn(saved[1])
    assert not [w for w in recwarn if "other layers or options" in str(w.message)]
    changed = small_cnn()
    changed[0].padding_mode = "reflect"
    changed[5] = nn.ReLU6()
    other = tmp_path / "changed.pt"
    torch.save(changed, other)
    with pytest.warns(UserWarning, match="other layers or options than the one converted"):
        load_snn(saved[1], model=str(other))


class BranchesOnTheImage(nn.Module):
    """Not traceable by fx: the ReLU taken depends on the image (``r2`` never, for positive images)."""

    def __init__(self):
        super().__init__()
        self.conv, self.r, self.r2, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.ReLU(), nn.Linear(256, 10)

    def forward(self, x):
        h = self.conv(x)
        return self.fc((self.r(h) if x.sum() > 0 else self.r2(h)).flatten(1))


def test_untraceable_model_branching_on_the_data_names_torch_save(tmp_path):
    torch.manual_seed(0)
    model, spec = BranchesOnTheImage().eval(), str(tmp_path / "branchy.pt")
    torch.save(model, spec)
    snn = hc.convert(model, [(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))])
    path = save_snn(snn, tmp_path / "branchy.safetensors", model=spec, num_classes=10)
    with pytest.raises(UserError, match=r"cannot trace this model.*torch\.save\(snn\)"):
        load_snn(path)


def test_cli_convert_then_evaluate_snn_reproduces_direct_evaluate(tmp_path, capsys):
    model = str(tmp_path / "mnist_cnn.pt")
    torch.save(nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(4 * 36, 10)).eval(), model)
    data = ["--dataset", "mnist", "--limit", "32", "--calib-size", "32", "--batch-size", "16", "--T", "3"]
    assert main(["convert", "--model", model, *data, "--out", str(tmp_path / "snn.safetensors")]) == 0
    assert main(["evaluate", "--model", model, *data, "--json", str(tmp_path / "direct.json")]) == 0
    assert main(["evaluate", "--snn", str(tmp_path / "snn.safetensors"), *data,
                 "--json", str(tmp_path / "loaded.json")]) == 0
    direct, loaded = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("direct", "loaded"))
    for key in ("snn_accuracy", "energy_ratio", "spikes_per_sample", "per_layer", "ann_accuracy", "config"):
        assert loaded[key] == direct[key], key


def test_snn_of_a_policy_registered_elsewhere_loads_with_its_thresholds(tmp_path, monkeypatch):
    """The file holds the thresholds; the rebuild re-ran the saved policy on a zero image, so an SNN
    converted with a register_policy name could not be loaded where that name is not registered
    (any other process, `hmtconv evaluate --snn` always)."""
    from hmtconv.conversion import policies

    def tenth_of_max(observer, spec):
        return observer.max.clamp_min(1e-3) / 10

    monkeypatch.setitem(policies.POLICIES, "tenth_of_max", tenth_of_max)
    model_file = tmp_path / "cnn.pt"
    torch.save(small_cnn(), model_file)
    snn = hc.convert(small_cnn(), images(), T=3, policy="opt,5=tenth_of_max")
    path = save_snn(snn, tmp_path / "s.safetensors", model=str(model_file), num_classes=10)
    monkeypatch.delitem(policies.POLICIES, "tenth_of_max")  # as in a process that never registered it
    loaded, meta = load_snn(path)
    assert loaded.config == snn.config and meta["config"]["policy"] == "opt,5=tenth_of_max"
    assert loaded.sites()["5"].neuron.lam == snn.sites()["5"].neuron.lam
    x = images(seed=5)[0][0]
    assert torch.equal(loaded(x), snn(x))


def test_evaluate_snn_on_data_with_other_classes_is_refused(tmp_path, monkeypatch, capsys):
    """The SNN of a random-weight built-in was scored on data with other classes: the rebuilt
    workload model took the data's classes, and the ANN compared with is the SNN's own ANN mode."""
    from torch.utils.data import TensorDataset
    from hmtconv.data import DATASETS, Splits

    def tiny(classes):
        images = TensorDataset(torch.rand(4, 1, 8, 8), torch.arange(4) % classes)
        return lambda root, transform: Splits(images, images, classes, (0.5,), (0.5,), "test")

    monkeypatch.setitem(DATASETS, "tiny10", tiny(10))
    monkeypatch.setitem(DATASETS, "tiny5", tiny(5))
    torch.manual_seed(0)
    model = MODELS["vgg_small"](in_channels=1, num_classes=10, image_size=8).eval()
    snn = hc.convert(model, images(batches=1), T=2)
    path = save_snn(snn, tmp_path / "s.safetensors", model="vgg_small", num_classes=10, extra={"dataset": "tiny10"})
    assert main(["evaluate", "--snn", str(path), "--dataset", "tiny5", "--no-progress"]) == 2
    assert "converted for 10 classes and images of shape [1, 8, 8], but dataset 'tiny5' has 5 classes" \
        in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:constant activations")
def test_hugging_face_directory_given_relative_loads_from_another_directory(tmp_path, monkeypatch):
    """``hf:./dir`` was saved as given, so `evaluate --snn` run elsewhere found no such directory."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.ResNetConfig(num_channels=1, embedding_size=4, hidden_sizes=[4], depths=[1], num_labels=10)
    tf.ResNetForImageClassification(config).eval().save_pretrained(tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    model = load_model("hf:./hf", None, in_channels=1, image_size=8, num_classes=10).model
    snn = hc.convert(model, images(batches=1), T=2)
    path = save_snn(snn, tmp_path / "s.safetensors", model="hf:./hf", num_classes=10)
    monkeypatch.chdir(tmp_path.parent)
    x = images(seed=5)[0][0]
    assert torch.equal(load_snn(path)[0](x), snn(x))
