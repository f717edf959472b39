"""Training: determinism, the checkpoint it writes, the cache, and config errors."""
import pytest
import torch

import hmtconv.train as train_module
from hmtconv.errors import UserError
from hmtconv.models import load_model
from hmtconv.train import TrainConfig, deterministic, resolve_device, train, trained_model


def tiny(**changes) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "limit": 2, "batch_size": 16, "device": "cpu", "progress": False} | changes)


def state(result):
    return result.model.state_dict()


def test_same_seed_gives_identical_weights_and_a_loadable_checkpoint(tmp_path):
    first = train(tiny(), out=tmp_path / "a.pt")
    second = train(tiny())
    assert all(torch.equal(v, state(second)[k]) for k, v in state(first).items())
    other = train(tiny(seed=1))
    assert not all(torch.equal(v, state(other)[k]) for k, v in state(first).items())

    record = torch.load(tmp_path / "a.pt", weights_only=True)
    meta = record["meta"]
    assert record["arch"] == "vgg_small" and record["kwargs"]["mean"] == [0.1307]
    assert meta["config"]["lr"] == 0.1 and meta["config"]["seed"] == 0 and meta["test_images"] == 1000
    assert meta["test_accuracy"] == first.test_accuracy and set(meta["versions"]) == {"hmtconv", "torch", "torchvision"}
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
    loaded = load_model(str(tmp_path / "a.pt"), in_channels=1, image_size=28, num_classes=10).model
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), first.model(x))


def test_adamw_cosine_and_label_smoothing_on_fake_data():
    config = tiny(dataset="fake", model="vit_small", optimizer="adamw", schedule="cosine", label_smoothing=0.1, limit=1)
    result = train(config)
    assert result.meta["config"]["weight_decay"] == 0.05 and 0 <= result.test_accuracy <= 1
    assert result.path is None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"optimizer": "adam"}, "optimizer 'adam' is not one of sgd, adamw"),
        ({"schedule": "step"}, "schedule 'step'"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"limit": 0}, "limit must be at least 1"),
        ({"label_smoothing": 1.0}, "label smoothing"),
        ({"dataset": "nope"}, "unknown dataset 'nope'"),
        ({"model": "nope"}, "unknown built-in model 'nope'"),
        ({"device": "banana"}, "--device 'banana' is not a device name"),
    ],
)
def test_config_errors(changes, message):
    with pytest.raises(UserError, match=message):
        train(tiny(**changes))


def test_devices_this_machine_lacks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda")
    for name, message in (("meta", "meta tensors hold shapes, no data"), ("mps", "--device mps is not available here")):
        with pytest.raises(UserError, match=message):
            resolve_device(name)
    assert resolve_device("auto") == torch.device("cpu")


def test_deterministic_restores_the_global_flags():
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic():
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


def test_trained_model_trains_once_then_uses_the_cache(tmp_path, monkeypatch):
    calls = []
    real_train = train_module.train

    def quick_train(config, out):
        calls.append(config)
        return real_train(tiny(model=config.model, dataset=config.dataset, seed=config.seed), out)

    monkeypatch.setattr(train_module, "train", quick_train)
    first = trained_model("vgg_small", "mnist", epochs=3, seed=2, cache_dir=tmp_path)
    again = trained_model("vgg_small", "mnist", epochs=3, seed=2, cache_dir=tmp_path)
    assert first == again == tmp_path / "vgg_small-mnist-e3-s2.pt" and first.is_file()
    assert len(calls) == 1 and calls[0].epochs == 3
