"""A model plus its data, ready for conversion: what ``evaluate``, ``convert``, ``sweep`` and ``demo`` share.

Everything a user can get wrong (model file, dataset name, shapes) fails here, before any
calibration, with a ``UserError`` that names the problem. Under torchrun the evaluation images
are split across ranks (each image on exactly one rank); calibration images too, and
``calibrate``/``evaluate`` combine the ranks' statistics and counts afterwards.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from . import distributed
from .data import DataInfo, calibration_subset, default_workers, evaluation_subset, get_datasets, make_loader
from .errors import UserError
from .models import check_model_fits, load_model


SEEDS = range(2**63)  # the random seeds torch takes (beyond, a traceback from deep inside it)


@dataclass
class DataOptions:
    dataset: str = "mnist"
    data_root: str | None = None
    calib_size: int = 1024
    calib_split: str = "train"  # never the evaluation images unless asked ("val")
    limit: int | None = None  # evaluate on the first `limit` evaluation images
    batch_size: int = 256
    seed: int = 0
    workers: int | None = None  # loader processes; None: data.loaders.default_workers (files: several)


@dataclass
class Workload:
    model: nn.Module  # eval mode, on the requested device
    calib_loader: DataLoader | None  # None: asked for no calibration (an SNN file has its thresholds)
    eval_loader: DataLoader
    info: DataInfo
    source: str  # what model was loaded, for logs and JSON
    eval_images: int  # over all ranks
    calib_images: int  # over all ranks: --calib-size, or the whole split where it is smaller

    def example_inputs(self) -> torch.Tensor:
        """One zero image of the data's size: what prepare traces a model whose forward branches on
        sizes with (the same on every rank, with or without data)."""
        return torch.zeros(1, *self.info.shape)


def shard_batches(dataset, batch_size: int):
    """This rank's contiguous run of whole batches (all of it in a single process).

    Splitting at the single-process batch boundaries gives every rank exactly the batches a
    single process would see (the last, shorter one included), so per-batch results are bit for
    bit the same and the combined counts equal a single-process run's. A rank may get nothing
    when there are fewer batches than ranks; the reductions handle that.
    """
    if distributed.world_size() == 1:
        return dataset
    batches = distributed.shard_indices(-(-len(dataset) // batch_size))
    return Subset(dataset, range(batches.start * batch_size, min(batches.stop * batch_size, len(dataset))))


def load_workload(model_spec: str, data: DataOptions, *, weights: str | None = None, device: str = "cpu",
                  allow_pickle: bool = True, calibration: bool = True, option: str = "--model") -> Workload:
    """The model and the data of a run; ``option`` names where the model was given (for errors)."""
    if data.batch_size < 1:  # checked before anything is loaded (also by make_loader, but after sharding)
        raise UserError(f"batch size must be at least 1, got {data.batch_size}")
    train_set, eval_set, info = get_datasets(data.dataset, data.data_root)
    loaded = load_model(model_spec, weights, in_channels=info.channels, image_size=info.image_size,
                        num_classes=info.num_classes, allow_pickle=allow_pickle)
    if loaded.source.startswith("pickled module") and distributed.is_main():
        print(f"hmtconv: warning: {model_spec} is a whole pickled model; loading it ran code stored in the "
              f"file. Only load files you trust (--no-pickle refuses them).", file=sys.stderr)
    if loaded.transform is not None:  # pretrained weights bring their own preprocessing
        train_set, eval_set, info = get_datasets(data.dataset, data.data_root, loaded.transform)
    check_model_fits(loaded.model, info, label=f"{option} {model_spec}")
    try:
        model = loaded.model.to(device).eval()
    except (RuntimeError, AssertionError) as error:
        raise UserError(f"cannot move the model to device {device!r}: {' '.join(str(error).split())}") from error
    pinned = torch.device(device).type == "cuda"  # (batches are copied to the GPU)

    def loader(images) -> DataLoader:
        workers = default_workers(images) if data.workers is None else data.workers
        return make_loader(shard_batches(images, data.batch_size), data.batch_size, seed=data.seed,
                           num_workers=workers, pin_memory=pinned)

    if data.limit is not None:
        if data.limit < 1:
            raise UserError(f"--limit must be at least 1, got {data.limit}")
        eval_set = evaluation_subset(eval_set, data.limit)
    calib_loader, calib_images = None, 0
    if calibration:
        available = len(train_set if data.calib_split == "train" else eval_set)
        if data.calib_size > available and distributed.is_main():
            print(f"hmtconv: note: --calib-size {data.calib_size} is more than the {data.calib_split} split's "
                  f"{available} images: calibrating on all of them", file=sys.stderr)
        # a random choice: the first images of a class-sorted split (ImageFolder's) are all of one class
        calib = calibration_subset(train_set, eval_set, split=data.calib_split, size=min(data.calib_size, available),
                                   seed=data.seed)
        calib_loader = loader(calib)
        calib_images = len(calib)
    return Workload(
        model=model,
        calib_loader=calib_loader,
        eval_loader=loader(eval_set),
        info=info,
        source=loaded.source,
        eval_images=len(eval_set),
        calib_images=calib_images,
    )
