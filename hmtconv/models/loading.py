"""Resolve ``--model`` / ``--weights`` into a model: built-in names, torchvision names, ``timm:NAME``,
``hf:ID`` (Hugging Face), checkpoints written by ``hmtconv train``, and (only when allowed) whole pickled modules."""
from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..errors import UserError
from .checkpoint import is_checkpoint, model_from_checkpoint
from .registry import MODELS
from .user_code import UNPICKLER, missing_code_hint

PICKLE_HINT = (
    "loading a whole pickled model runs code stored in the file; the CLI does it (with a warning) unless "
    "--no-pickle is given, Python callers pass allow_pickle=True"
)

WRAPPERS = ("state_dict", "model", "model_state_dict")  # where training scripts keep the weights
WEIGHTS_HINT = "weights are read without pickle: save model.state_dict(), or pass a whole pickled model as --model"


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on the CPU
    transform: Callable | None  # the weights' own preprocessing; None: use the dataset's default
    source: str  # what was loaded, for logs


def one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def describe(weights: str | None) -> str:
    return f" with weights {weights}" if weights else " (untrained)"


def read_file(path: str | Path, allow_pickle: bool = False, hint: str = PICKLE_HINT):
    """``torch.load`` on the CPU, weights-only unless ``allow_pickle``; failures become UserErrors,
    ``hint`` saying what to do with a file that holds Python objects other than tensors."""
    if not Path(path).is_file():
        raise UserError(f"file {path} not found")
    try:
        if allow_pickle:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=UNPICKLER)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):  # the weights-only unpickler met a class: a module, an object
            raise UserError(f"{path} is not weights-only (likely a whole pickled nn.Module): {hint}") from error
        if "Weights only load failed" in str(error):  # (torch's text would suggest weights_only=False)
            raise UserError(f"cannot read {path} as a PyTorch file (not written by torch.save, or corrupted)") \
                from error
        raise UserError(f"cannot read {path} as a PyTorch file: {one_line(error)}") from error
    except Exception as error:  # torch.load's failures on a foreign file are of many types
        if (fix := missing_code_hint(error)) is not None:  # a pickled model's classes not importable here
            raise UserError(f"cannot load {path}: {fix}") from error
        raise UserError(f"cannot read {path} as a PyTorch file: {error!r}") from error


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a ``.safetensors`` file, a ``torch.save``d state_dict (bare or under one of
    ``WRAPPERS``), or a train checkpoint."""
    if str(path).endswith(".safetensors") and Path(path).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise UserError(f"cannot read {path} as a safetensors file (truncated or corrupted?): {error}") from error
    obj = read_file(path, hint=WEIGHTS_HINT)
    if is_checkpoint(obj):
        return obj["state_dict"]
    if isinstance(obj, dict) and not is_state_dict(obj):  # a training script's {"state_dict": ..., "epoch": ...}
        obj = next((obj[key] for key in WRAPPERS if is_state_dict(obj.get(key))), obj)
    if not is_state_dict(obj):
        found = f"a dict with keys {', '.join(map(str, list(obj)[:8]))}" if isinstance(obj, dict) \
            else f"a {type(obj).__name__}"
        raise UserError(f"weights file {path} does not hold a state_dict (a dict of tensors) but {found}")
    return obj


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_weights_file(model: nn.Module, path: str, label: str) -> None:
    """``path``'s state_dict into ``model``; the ``module.`` prefix of a (Distributed)DataParallel
    model's weights is dropped."""
    state_dict = read_state_dict(path)
    if all(k.startswith("module.") for k in state_dict) and not any(k.startswith("module.")
                                                                    for k in model.state_dict()):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise UserError(f"weights {path} do not fit {label}: {one_line(error)}") from error


def from_builtin(name: str, weights: str | None, in_channels: int, image_size: int, num_classes: int) -> LoadedModel:
    model = MODELS[name](in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    if weights is not None:
        if not Path(weights).is_file():
            raise UserError(f"--weights {weights}: no such file (built-in models take a state_dict or checkpoint file)")
        load_weights_file(model, weights, f"built-in {name}")
    return LoadedModel(model.eval(), None, f"built-in {name}" + describe(weights))


def from_torchvision(name: str, weights: str | None, num_classes: int) -> LoadedModel:
    """No weights: fresh, ``num_classes`` outputs. A weights file: its state_dict into that model, fed the
    images as the dataset gives them (no ImageNet normalization). ``DEFAULT`` or an enum name: torchvision's
    pretrained weights (downloaded once into ``torch.hub.get_dir()/checkpoints``) and their transforms."""
    if weights is None or Path(weights).is_file() or Path(weights).suffix in (".pt", ".pth", ".safetensors"):
        model = torchvision.models.get_model(name, num_classes=num_classes)
        if weights is not None:
            load_weights_file(model, weights, f"torchvision {name} with {num_classes} classes")
        return LoadedModel(model.eval(), None, f"torchvision {name}" + describe(weights))
    enum = torchvision.models.get_model_weights(name)
    try:
        chosen = enum.verify(weights)
    except (KeyError, ValueError) as error:
        names = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))  # (__members__ holds the DEFAULT alias)
        raise UserError(f"--weights {weights!r} is neither a file nor a {enum.__name__} name ({names})") from error
    try:
        model = torchvision.models.get_model(name, weights=chosen)
    except OSError as error:  # URLError on a machine without internet
        cache = Path(torch.hub.get_dir()) / "checkpoints"  # where torchvision looks before downloading
        raise UserError(
            f"cannot download {chosen} ({one_line(error)}); download {chosen.url} elsewhere, put the file "
            f"(keeping its name) into {cache}/ and pass --weights {weights} again (not --weights FILE: a file's "
            "model gets the images as the dataset gives them, without ImageNet normalization, right only for "
            "weights trained that way)"
        ) from error
    return LoadedModel(model.eval(), chosen.transforms(), f"torchvision {name} with {chosen}")


def from_timm(name: str, weights: str | None, in_channels: int, image_size: int, num_classes: int) -> LoadedModel:
    """``DEFAULT``: timm's pretrained weights (their classes) and preprocessing; else a fresh model,
    built for the data's image size where its constructor takes one (ViTs: ``img_size``), with a weights
    file's state_dict if given, fed the images as the dataset gives them (no ImageNet normalization)."""
    try:
        import timm
    except ImportError as error:
        hint = "pip install 'hmtconv[timm]'"
        raise UserError(f"--model timm:{name} needs timm, which is not installed: {hint}") from error
    pretrained = weights == "DEFAULT"
    kwargs = {} if pretrained else {"num_classes": num_classes, "in_chans": in_channels, "img_size": image_size}
    try:
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as error:  # a model of any input size (CNNs) takes no img_size
            if "img_size" not in str(error):
                raise
            model = timm.create_model(name, pretrained=pretrained, **{k: v for k, v in kwargs.items() if k != "img_size"})
    except (RuntimeError, OSError, TypeError) as error:  # unknown name, no internet for the download, bad arguments
        hint = ("; without internet, copy the Hugging Face cache (HF_HOME, ~/.cache/huggingface) from a machine where "
                "--weights DEFAULT downloaded (not --weights FILE: a file's model gets the images without ImageNet "
                "normalization)"
                if pretrained and isinstance(error, OSError) else "")
        raise UserError(f"timm cannot create {name!r}: {one_line(error)}{hint}") from error
    if weights is not None and not pretrained:
        load_weights_file(model, weights, f"timm {name}")
    transform = None
    if pretrained:
        from timm.data import create_transform, resolve_data_config

        transform = create_transform(**resolve_data_config({}, model=model))
    return LoadedModel(model.eval(), transform, f"timm {name}" + describe(weights))


def from_hugging_face(name: str, weights: str | None) -> LoadedModel:
    """``hf:ID`` (downloaded once) or ``hf:DIRECTORY`` (written by ``save_pretrained``): a transformers
    image classifier with its weights, and its image processor as the transform where it has one."""
    if weights is not None:
        raise UserError(f"--weights {weights} cannot be combined with hf:{name} (from_pretrained reads its weights)")
    try:
        import transformers
    except ImportError as error:
        raise UserError(f"--model hf:{name} needs transformers, which is not installed: pip install 'hmtconv[hf]'") \
            from error
    if name.startswith(("/", ".", "~")):  # a path, not a Hub id
        if not Path(name).expanduser().is_dir():
            raise UserError(f"--model hf:{name}: no such directory (a save_pretrained directory, or a Hub id like "
                            f"google/vit-base-patch16-224)")
        name = str(Path(name).expanduser())
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(name)
    except (OSError, ValueError) as error:  # not found, no internet, not an image classifier
        raise UserError(f"transformers cannot load the image classifier {name!r}: {one_line(error)}") from error
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):  # none saved: the dataset's own transform
        processor = None
    transform = None if processor is None else partial(_pixel_values, processor)
    return LoadedModel(model.eval(), transform, f"Hugging Face {name}")


def _pixel_values(processor, image) -> torch.Tensor:
    return processor(images=image, return_tensors="pt")["pixel_values"][0]


def from_file(path: str, weights: str | None, allow_pickle: bool) -> LoadedModel:
    if weights is not None:
        raise UserError(f"--weights {weights} cannot be combined with the model file {path}")
    from ..snn_io import is_snn_file  # (here, not at the top: snn_io imports this package)

    if is_snn_file(path):  # (whatever its suffix: convert --out x.pt writes one)
        raise UserError(f"{path} is an SNN saved by `hmtconv convert`: pass it as --snn {path}")
    obj = read_file(path, allow_pickle)
    if is_checkpoint(obj):
        return LoadedModel(model_from_checkpoint(obj, path), None, f"checkpoint {path} ({obj['arch']})")
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.eval(), None, f"pickled module {path} ({type(obj).__name__})")
    if isinstance(obj, dict):
        raise UserError(f"{path} is a state_dict without an architecture; pass --model ARCH --weights {path}")
    raise UserError(f"{path} holds a {type(obj).__name__}, not a model")


def load_model(
    spec: str,
    weights: str | None = None,
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Resolve ``spec``: a built-in name, a torchvision classification model name, ``timm:NAME``,
    ``hf:ID`` or ``hf:DIRECTORY`` (Hugging Face), or a file (a train checkpoint; a whole pickled module only with ``allow_pickle``).
    ``weights``: None, ``DEFAULT`` or a weights enum name (torchvision), or a state_dict file.
    The data's shape is used to build fresh models; check the result with ``check_model_fits``."""
    if spec.startswith("timm:"):
        return from_timm(spec.removeprefix("timm:"), weights, in_channels, image_size, num_classes)
    if spec.startswith("hf:"):
        return from_hugging_face(spec.removeprefix("hf:"), weights)
    if spec in MODELS:
        return from_builtin(spec, weights, in_channels, image_size, num_classes)
    if spec in torchvision.models.list_models(module=torchvision.models):
        return from_torchvision(spec, weights, num_classes)
    if Path(spec).is_file():
        return from_file(spec, weights, allow_pickle)
    raise UserError(unknown_model(spec))


def unknown_model(spec: str) -> str | None:
    """What is wrong with ``spec`` as a model reference (see :func:`load_model`), or None where it
    names one (whether it builds is known only by building it)."""
    if spec.startswith(("timm:", "hf:")) or spec in MODELS or Path(spec).is_file() \
            or spec in torchvision.models.list_models(module=torchvision.models):
        return None
    return (f"model {spec!r} is not a file, a built-in model ({', '.join(sorted(MODELS))}), a torchvision "
            f"classification model name, timm:NAME, or hf:ID / hf:DIRECTORY (Hugging Face)")


def builds_random_weights(spec: str, weights: str | None) -> bool:
    """Whether ``load_model(spec, weights)`` initialises a network at random (a built-in,
    torchvision or timm name without weights): a different network each time it is built."""
    return weights is None and (spec.startswith("timm:") or spec in MODELS
                                or spec in torchvision.models.list_models(module=torchvision.models))
