"""Save and load a converted SNN without pickle: tensors in safetensors, everything else in JSON.

The file holds every tensor of the SNN (weights, thresholds, energy counts) and, as JSON metadata,
the conversion config, the input shape, a reference to the model (what ``--model`` accepts) and a
SHA-256 of the tensors. Loading rebuilds the graph from that reference with the same
deterministic steps as ``convert`` (on a zero calibration batch, whose thresholds are then
overwritten by the file's), so outputs are bit-identical to the SNN that was saved. Only the
architecture comes from the reference: its weights are replaced by the file's. A reference that
now builds other tensors is refused; one that builds the same tensors in other layers or with
other options (a ReLU6 for a ReLU, another padding mode) is caught by a SHA-256 of the network's
structure, also saved, and loads with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import fx
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .atomic import atomic_path
from .conversion import SNN, ConversionConfig, calibrate, convert, prepare
from .conversion.rebuild import rebuilding
from .device import placement, resolve_device
from .errors import UserError
from .models import load_model
from .models.loading import unknown_model

FORMAT, VERSION = "hmtconv-snn", 1


def save_snn(snn: SNN, path: str | os.PathLike, *, model: str, weights: str | None = None,
             num_classes: int, extra: dict | None = None) -> Path:
    """Write ``snn`` atomically; ``model``/``weights`` say how to rebuild its architecture."""
    if not isinstance(snn, SNN):
        raise TypeError(f"save_snn saves what hmtconv.convert returns, got {type(snn).__name__}")
    if not isinstance(model, str) or not model:
        raise TypeError(f"save_snn: model= must name the architecture to rebuild (a built-in or torchvision name, "
                        f"timm:NAME, hf:ID, or a checkpoint file), got {model!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise TypeError(f"save_snn: num_classes= must be a positive int, got {num_classes!r}")
    model, weights = absolute(model), absolute(weights)
    unknown = unknown_model(model)  # (load_snn rebuilds the architecture from it)
    if unknown:
        raise ValueError(f"save_snn: {unknown}; for a model of your own, save it whole (torch.save(model, "
                         f"'model.pt')) and pass model='model.pt'")
    outputs = _output_size(snn)
    if outputs not in (None, num_classes):
        raise ValueError(f"save_snn: num_classes={num_classes}, but the SNN outputs {outputs} classes (load_snn "
                         f"builds the model with num_classes)")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"save_snn: {path} is a directory; give a file name")
    try:
        json.dumps(extra or {})
    except TypeError as error:
        raise TypeError(f"save_snn: extra= must hold JSON values (it goes into the file's description): {error}") \
            from None
    tensors, stored = {}, set()
    for k, v in snn.state_dict().items():  # a tensor under two names (timm's F.layer_norm weights) stored twice
        v = v.detach().cpu().contiguous()
        tensors[k] = v.clone() if v.untyped_storage().data_ptr() in stored else v
        stored.add(v.untyped_storage().data_ptr())
    meta = {"format": FORMAT, "version": VERSION, "hmtconv": __version__, "config": snn.config.to_dict(),
            "input_shape": list(snn.report.input_shape), "num_classes": num_classes,
            "dtype": str(placement(snn)[1]).removeprefix("torch."),
            "model": {"spec": model, "weights": weights}, "sha256": digest(tensors), "structure": structure(snn),
            "extra": extra or {}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={FORMAT: json.dumps(meta)})
    return path


@torch.no_grad()
def _output_size(snn: SNN) -> int | None:
    """The number of logits the SNN gives per sample (one step on a zero image), or None where its
    output is not ``[T, B, classes]``."""
    device, dtype = placement(snn)
    out = snn(torch.zeros(1, *snn.report.input_shape, device=device, dtype=dtype), 1)
    return out.shape[-1] if isinstance(out, torch.Tensor) and out.dim() == 3 else None


def absolute(reference: str | None) -> str | None:
    """A model or weights file, or an ``hf:DIRECTORY``, as an absolute path, so that the SNN file
    loads from any working directory; other references (names, Hub ids) as they are."""
    if reference is None:
        return None
    prefix, directory = ("hf:", reference[3:]) if reference.startswith("hf:") else ("", reference)
    path = Path(directory).expanduser()
    found = path.is_dir() if prefix else path.is_file()
    # (from_pretrained reads a local folder before asking the Hub, so "hf:name" of a folder is that folder)
    return prefix + str(path.resolve()) if found else reference


def structure(snn: SNN) -> str:
    """SHA-256 of the network apart from its tensors: the traced graph's code and the module tree
    with each module's options (memory addresses blanked). Two models whose tensors match in name
    and shape can still differ there (a ReLU6 for a ReLU, another padding mode)."""
    code = snn.net.code if isinstance(snn.net, fx.GraphModule) else ""
    # the children, not the root, whose class name depends on how it was traced
    text = code + "".join(f"\n{name}: {child!r}" for name, child in snn.net.named_children())
    return hashlib.sha256(re.sub(r"0x[0-9a-fA-F]+", "0x", text).encode()).hexdigest()


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes: catches bytes flipped inside the tensor data,
    which safetensors itself does not notice."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _description(path: str | os.PathLike) -> str | None:
    """The JSON description of an SNN file, read without its tensors; None where there is none."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get(FORMAT)
    except (SafetensorError, OSError):
        return None


def is_snn_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`save_snn` (torch.load reads it as a dict)."""
    return _description(path) is not None


def recorded_code(path: str | os.PathLike) -> list[str]:
    """The ``--code`` files the SNN file was converted with (none where it cannot say: loading the
    file then tells what is wrong with it), read without its tensors."""
    try:
        meta = json.loads(_description(path) or "{}")
        return list(meta.get("extra", {}).get("code") or [])
    except (json.JSONDecodeError, AttributeError):
        return []


def read_snn_file(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata, tensors)``; a clear UserError for a missing, truncated, foreign or newer file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"SNN file {path} is a directory; give the file `hmtconv convert --out` wrote")
    if not path.is_file():
        raise UserError(f"SNN file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(FORMAT)
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        with open(path, "rb") as f:
            torch_file = f.read(2) == b"PK"  # (torch.save writes a zip)
        if torch_file:
            raise UserError(f"{path} is a PyTorch file (a training checkpoint or a model?), not an SNN file: pass "
                            f"it as --model {path}") from error
        raise UserError(f"{path} is not a readable SNN file (truncated or corrupted?): {error}") from error
    if raw is None:
        raise UserError(f"{path} is a safetensors file but not an SNN saved by `hmtconv convert`")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: the SNN description in the file is corrupted ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = meta.get("version") if isinstance(meta, dict) else None
        raise UserError(f"{path} is an SNN file of format version {found}; this hmtconv {__version__} reads "
                        f"{FORMAT} version {VERSION} only: convert the model again with this version")
    if meta.get("sha256") != digest(tensors):
        raise UserError(f"{path} is corrupted: its tensors do not match the checksum written with them")
    missing = [key for key in ("config", "input_shape", "num_classes", "model") if key not in meta]
    if not missing:  # (what load_snn reads)
        config, model = meta["config"], meta["model"]
        missing = [f"config.{key}" for key in ConversionConfig.__dataclass_fields__
                   if not isinstance(config, dict) or key not in config]
        missing += [f"model.{key}" for key in ("spec", "weights") if not isinstance(model, dict) or key not in model]
    if missing:
        raise UserError(f"{path}: the SNN description in the file lacks {', '.join(missing)} (edited by hand?); "
                        f"convert the model again")
    return meta, tensors


def check_data_fits(meta: dict, path: str | os.PathLike, dataset: str, shape, num_classes: int) -> None:
    """A UserError unless the data has the image shape and classes the saved SNN was converted for:
    an SNN of a random-weight model (a built-in or torchvision name without weights) would else
    be scored on labels its outputs do not stand for, since the rebuilt model takes the data's classes."""
    saved = meta["input_shape"], meta["num_classes"]
    if list(shape) != saved[0] or num_classes != saved[1]:
        raise UserError(f"{path} was converted for {saved[1]} classes and images of shape {saved[0]}, but dataset "
                        f"{dataset!r} has {num_classes} classes and images of shape {list(shape)}: evaluate it on "
                        f"data like its own ({meta.get('extra', {}).get('dataset', 'unknown')}) or convert again")


def load_snn(path: str | os.PathLike, *, model: str | None = None, weights: str | None = None,
             device: str = "cpu", allow_pickle: bool = True) -> tuple[SNN, dict]:
    """Rebuild the saved SNN (same graph, same tensors); returns ``(snn, metadata)``. ``model`` and
    ``weights`` replace the saved model reference (e.g. the model file has moved)."""
    device = resolve_device(str(device), what="load_snn(device=...):")
    meta, tensors = read_snn_file(path)
    shape, config = meta["input_shape"], meta["config"]
    spec = model or meta["model"]["spec"]
    loaded = load_model(spec, weights or meta["model"]["weights"], in_channels=shape[0], image_size=shape[-1],
                        num_classes=meta["num_classes"], allow_pickle=allow_pickle)
    if "dtype" in meta:  # a float64 SNN of a model that is built in float32 (a built-in or torchvision name)
        loaded.model.to(getattr(torch, meta["dtype"]))
    zero_batch = [torch.zeros(1, *shape)]
    with warnings.catch_warnings():  # the zero batch is constant by design: no sigma = 0 warning
        warnings.simplefilter("ignore")
        try:
            with rebuilding(key[len("net."):-len(".neuron.lam")] for key in tensors if key.endswith(".neuron.lam")):
                prepared = prepare(loaded.model, identity=config["identity"], example_inputs=zero_batch[0])
            # the thresholds come from the file, so any built-in policy rebuilds the graph: the saved
            # one may be a name registered (register_policy) only in the process that converted
            snn = convert(calibrate(prepared, zero_batch), **{**config, "policy": "max"})
        except (ValueError, TypeError) as error:
            raise UserError(f"{path} cannot be rebuilt from the model {spec!r}: {error}") from error
    snn.config.policy = config["policy"]  # what the thresholds were chosen by (a label from here on)
    own = snn.state_dict()
    mismatched = (sorted(set(own) ^ set(tensors))
                  or [k for k in own if (own[k].shape, own[k].dtype) != (tensors[k].shape, tensors[k].dtype)])
    if mismatched:
        untraced = "" if snn.report.traced else (
            "; or, since torch.fx cannot trace this model, its forward may branch on the data, which the "
            "rebuild (on a zero image) cannot follow: keep such an SNN with torch.save(snn) instead")
        raise UserError(f"{path} was saved from a different model than {spec!r} "
                        f"(first mismatching tensor: {mismatched[0]}); pass the model it was converted from"
                        + untraced)
    snn.load_state_dict(tensors, strict=True)
    if meta.get("structure", structure(snn)) != structure(snn):  # (files written before it: no check)
        warnings.warn(f"{path}: the model {spec!r} builds a network with the saved tensors but other layers or "
                      f"options than the one converted (the model's code changed since?); its outputs may "
                      f"differ from the saved SNN's", stacklevel=2)
    return snn.to(device).eval(), meta
