"""Built-in models, checkpoints, ``load_model`` for each kind of ``--model``, and the fit check."""
import sys
import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from hmtconv.data import DataInfo
from hmtconv.errors import UserError
from hmtconv.models import (
    MODELS,
    Normalize,
    check_model_fits,
    create_model,
    load_checkpoint,
    load_model,
    save_checkpoint,
)

SHAPE = dict(in_channels=1, image_size=28, num_classes=10)


def info(shape=(1, 28, 28), num_classes=10) -> DataInfo:
    return DataInfo("test-data", shape, num_classes, (0.5,) * shape[0], (0.5,) * shape[0], "test")


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels, size, classes", [(1, 28, 10), (3, 32, 100)])
def test_builtin_forward_shape_and_normalize_first(name, channels, size, classes):
    stats = dict(mean=[0.5] * channels, std=[0.25] * channels)
    model = create_model(name, in_channels=channels, image_size=size, num_classes=classes, **stats)
    assert isinstance(model[0], Normalize) and "normalize.mean" in model.state_dict()
    with torch.no_grad():
        assert model.eval()(torch.rand(2, channels, size, size)).shape == (2, classes)
    check_model_fits(model, info((channels, size, size), classes))


def test_resnet18_small_keeps_max_pooling_and_has_a_3x3_stem():
    net = create_model("resnet18_small", **SHAPE).net
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1) and isinstance(net.maxpool, nn.MaxPool2d)


def test_unknown_builtin():
    with pytest.raises(UserError, match="unknown built-in model 'nope'.*vgg_small"):
        create_model("nope")


def test_normalize_channel_mismatch():
    with pytest.raises(UserError, match="3 channels but the model has in_channels=1"):
        create_model("vgg_small", in_channels=1, mean=[0.5] * 3, std=[0.5] * 3)


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    model = create_model("vgg_small", **SHAPE, mean=[0.1307], std=[0.3081])
    kwargs = dict(SHAPE, mean=[0.1307], std=[0.3081])
    path = save_checkpoint(tmp_path / "sub" / "m.pt", model, "vgg_small", kwargs, {"acc": 0.5})
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temporary file left behind
    assert torch.load(path, weights_only=True)["arch"] == "vgg_small"
    loaded, meta = load_checkpoint(path)
    assert meta == {"acc": 0.5} and same_weights(loaded, model) and not loaded.training
    result = load_model(str(path), **SHAPE)  # no allow_pickle needed
    assert same_weights(result.model, model) and result.transform is None and "checkpoint" in result.source


def test_checkpoint_rejects_non_json_metadata(tmp_path):
    model = create_model("vgg_small", **SHAPE)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "m.pt", model, "vgg_small", SHAPE, {"bad": object()})


def test_builtin_name_with_a_weights_file(tmp_path):
    model = create_model("vgg_small", **SHAPE, mean=[0.1307], std=[0.3081])
    torch.save(model.state_dict(), tmp_path / "w.pt")
    loaded = load_model("vgg_small", str(tmp_path / "w.pt"), **SHAPE).model
    assert same_weights(loaded, model)  # including the normalization buffers
    with pytest.raises(UserError, match="do not fit built-in vgg_small.*size mismatch"):
        load_model("vgg_small", str(tmp_path / "w.pt"), in_channels=1, image_size=28, num_classes=5)
    with pytest.raises(UserError, match="--weights DEFAULT: no such file"):
        load_model("vgg_small", "DEFAULT", **SHAPE)


def test_torchvision_name_with_a_state_dict_file(tmp_path):
    reference = torchvision.models.get_model("squeezenet1_1", num_classes=10)
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    save_file(reference.state_dict(), tmp_path / "w.safetensors")
    for weights in ("w.pt", "w.safetensors"):
        result = load_model("squeezenet1_1", str(tmp_path / weights), in_channels=3, image_size=64, num_classes=10)
        assert same_weights(result.model, reference) and result.transform is None
    with pytest.raises(UserError, match="squeezenet1_1 with 5 classes: .*size mismatch"):
        load_model("squeezenet1_1", str(tmp_path / "w.pt"), in_channels=3, image_size=64, num_classes=5)
    with pytest.raises(UserError, match="file .*missing.pt not found"):
        load_model("squeezenet1_1", str(tmp_path / "missing.pt"), in_channels=3, image_size=64, num_classes=5)


def test_torchvision_weights_by_name(monkeypatch):
    with pytest.raises(UserError, match=r"'NOPE' is neither a file nor a SqueezeNet1_1_Weights name "
                                        r"\(DEFAULT, IMAGENET1K_V1\)$"):  # (DEFAULT once)
        load_model("squeezenet1_1", "NOPE", in_channels=3, image_size=224, num_classes=1000)

    fresh = torchvision.models.squeezenet1_1().state_dict()
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", lambda self, *a, **k: fresh)
    enum_name = "SqueezeNet1_1_Weights.IMAGENET1K_V1"
    result = load_model("squeezenet1_1", enum_name, in_channels=3, image_size=224, num_classes=1000)
    assert result.transform.crop_size == [224]  # the weights' own preprocessing


def test_torchvision_weights_offline_from_the_hub_cache(tmp_path, monkeypatch):
    """The download error's advice works: the file put into the hub cache is read without a
    download, with the weights' own preprocessing (a --weights FILE would get none)."""
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    url = torchvision.models.SqueezeNet1_1_Weights.DEFAULT.url
    with pytest.raises(UserError) as caught:
        load_model("squeezenet1_1", "DEFAULT", in_channels=3, image_size=224, num_classes=1000)
    assert f"download {url} elsewhere, put the file (keeping its name) into {tmp_path / 'checkpoints'}/ and pass " \
           "--weights DEFAULT again" in str(caught.value) and "without ImageNet normalization" in str(caught.value)

    reference = torchvision.models.squeezenet1_1()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / url.rsplit("/", 1)[1])
    result = load_model("squeezenet1_1", "DEFAULT", in_channels=3, image_size=224, num_classes=1000)
    assert same_weights(result.model, reference) and result.transform.crop_size == [224]


def test_pickled_module_needs_the_flag(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UserError, match="runs code stored in the file.*allow_pickle=True"):
        load_model(str(tmp_path / "whole.pt"), **SHAPE)
    result = load_model(str(tmp_path / "whole.pt"), **SHAPE, allow_pickle=True)
    assert same_weights(result.model, model) and "pickled module" in result.source


def test_file_errors(tmp_path):
    torch.save(create_model("vgg_small", **SHAPE).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(UserError, match="state_dict without an architecture; pass --model ARCH --weights"):
        load_model(str(tmp_path / "sd.pt"), **SHAPE)
    (tmp_path / "junk.pt").write_text("hello")
    with pytest.raises(UserError, match="cannot read .*junk.pt as a PyTorch file"):
        load_model(str(tmp_path / "junk.pt"), **SHAPE)
    with pytest.raises(UserError, match="'nope.pt' is not a file, a built-in model.*timm:NAME, or hf:ID / "
                       "hf:DIRECTORY"):  # every kind of --model named
        load_model("nope.pt", **SHAPE)


def test_weights_saved_by_training_scripts_load(tmp_path):
    """{"state_dict": ...} / {"model": ...} with other entries, and DataParallel's module. prefix."""
    model = create_model("vgg_small", **SHAPE, mean=[0.1307], std=[0.3081])
    state = model.state_dict()
    saved = {"wrapped": {"state_dict": state, "epoch": torch.tensor(3)}, "model": {"model": state, "best_acc": 0.9},
             "parallel": {"module." + k: v for k, v in state.items()}}
    for name, obj in saved.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        assert same_weights(load_model("vgg_small", str(tmp_path / f"{name}.pt"), **SHAPE).model, model), name
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not hold a state_dict .* but a dict with keys weights"):
        load_model("vgg_small", str(tmp_path / "other.pt"), **SHAPE)


def test_unreadable_weights_and_checkpoints_are_clear_errors(tmp_path):
    """A cut .safetensors, bytes torch.save never wrote, a whole module as --weights (which never
    unpickles: no --no-pickle hint) and a checkpoint whose architecture changed since it was written."""
    model = create_model("vgg_small", **SHAPE)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot read .*cut.safetensors as a safetensors file"):
        load_model("vgg_small", str(tmp_path / "cut.safetensors"), **SHAPE)
    (tmp_path / "junk.pt").write_bytes(b"garbage" * 10)
    for spec, weights in (("vgg_small", str(tmp_path / "junk.pt")), (str(tmp_path / "junk.pt"), None)):
        with pytest.raises(UserError, match="cannot read .*junk.pt as a PyTorch file \\(not written by torch.save"):
            load_model(spec, weights, **SHAPE)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(UserError, match="weights are read without pickle: save model.state_dict"):
        load_model("vgg_small", str(tmp_path / "whole.pt"), **SHAPE)
    record = torch.load(save_checkpoint(tmp_path / "c.pt", model, "vgg_small", SHAPE, {}), weights_only=True)
    for change in ({"kwargs": {**SHAPE, "width": 3}}, {"state_dict": dict(list(record["state_dict"].items())[:-1])}):
        torch.save({**record, **change}, tmp_path / "old.pt")
        for load in (lambda: load_model(str(tmp_path / "old.pt"), **SHAPE), lambda: load_checkpoint(tmp_path / "old.pt")):
            with pytest.raises(UserError, match="checkpoint .*old.pt: its vgg_small does not match this hmtconv's"):
                load()


def test_timm_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail as if not installed
    with pytest.raises(UserError, match=r"timm:vit_base_patch16_224 needs timm.*hmtconv\[timm\]"):
        load_model("timm:vit_base_patch16_224", **SHAPE)


@pytest.mark.parametrize(
    "model, data, message",
    [
        ("vgg_small", info((3, 28, 28)), "expects 1-channel images but dataset 'test-data' has 3 channel"),
        ("vgg_small", info((1, 32, 32)), "does not accept 32x32 images"),
        ("vit_small", info((1, 32, 32)), "does not accept 32x32 images.*Wrong image height"),
        ("resnet18_small", info((1, 28, 28), num_classes=100), "outputs 10 classes but dataset 'test-data' has 100"),
    ],
)
def test_mismatch_names_the_problem(model, data, message):
    net = create_model(model, **SHAPE).train()
    with pytest.raises(UserError, match=message):
        check_model_fits(net, data, "the model")
    assert net.training  # the check leaves the mode as it found it


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_of_another_dtype_fits(dtype):
    net = nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 12 * 12, 10))
    check_model_fits(net.to(dtype), info())  # (convert moves the images to the model's dtype)


def test_fresh_timm_models_fit_the_data():
    vit = load_model("timm:vit_tiny_patch16_224", in_channels=1, image_size=32, num_classes=10)
    assert vit.model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)  # built for 32x32 (2x2 patches)
    cnn = load_model("timm:resnet18", in_channels=1, image_size=32, num_classes=10)  # takes no img_size
    assert cnn.model(torch.zeros(2, 1, 32, 32)).shape == (2, 10) and "untrained" in cnn.source
    with pytest.raises(UserError, match="timm cannot create 'no_such_net'"):
        load_model("timm:no_such_net", in_channels=1, image_size=32, num_classes=10)


def test_timm_offline_download_says_where_the_weights_are_read(monkeypatch):
    timm = pytest.importorskip("timm")

    def offline(*args, **kwargs):
        raise OSError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match="without internet, copy the Hugging Face cache .*not --weights FILE"):
        load_model("timm:resnet18", "DEFAULT", in_channels=3, image_size=224, num_classes=1000)
