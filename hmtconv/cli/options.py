"""Options shared by ``evaluate``, ``convert`` and ``demo``: model, data, conversion and output files."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..conversion import POLICIES
from ..conversion.memory import parse_bytes
from ..conversion.policies import parse_policy
from ..conversion.snn import GRANULARITIES, IDENTITIES, NEURONS, ConversionConfig
from ..data import list_datasets
from ..errors import UserError
from ..neurons.multilevel import MAX_N
from ..workload import SEEDS, DataOptions


DEFAULT_T = 4
FIXED_BY_SNN = ("n", "policy", "neuron", "identity", "communicate", "granularity")  # all but T


def policy_value(text: str) -> str | float:
    """A registered policy name ("opt", "999", ...), a percentile such as 99.99, or either followed
    by per-site overrides: "opt,*.mix_in0=999" (see hmtconv.conversion.policies.parse_policy)."""
    try:
        base, overrides = parse_policy(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text if overrides else base


def positive_int(name: str, maximum: int | None = None, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{name} must be in {minimum}..{maximum}, got {value}")
        return value
    return parse


def random_seed(text: str) -> int:
    """A random seed, one of workload.SEEDS."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer, got {text!r}") from None
    if value not in SEEDS:
        raise argparse.ArgumentTypeError(f"--seed must be in 0..{SEEDS[-1]}, got {value}")
    return value


def memory_size(text: str) -> str:
    """A memory size such as 4GB, checked now (kept as typed, for the JSON provenance)."""
    try:
        parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_code_option(parser) -> None:
    parser.add_argument("--code", action="append", default=[], metavar="FILE.py",
                        help="a Python file defining the classes of a pickled model (the script that saved it, or "
                        "the module it imported them from); imported before the model is loaded; repeatable")


def add_workers_option(add) -> None:
    """``--workers`` (``add``: a parser's or a group's add_argument); default None: default_workers."""
    add("--workers", type=positive_int("--workers", minimum=0), default=None, help="data loader processes (0: the "
        "main process; default: several for image folders, 0 for data held in memory)")


def add_model_and_data(parser: argparse.ArgumentParser, evaluates: bool = True) -> None:
    d = DataOptions()
    group = parser.add_argument_group("model and data")
    group.add_argument("--model", help="built-in name, torchvision name, timm:NAME, hf:ID or hf:DIRECTORY (Hugging "
                       "Face, with its image processor), a checkpoint from "
                       "`hmtconv train`, or a whole pickled nn.Module (runs code from the file: trusted files only)")
    group.add_argument("--weights", default=None, help="DEFAULT or a torchvision weights name (with their "
                       "preprocessing; offline: put the download into torch's hub cache, checkpoints/), or a "
                       "state_dict file (its model gets the images as the dataset gives them: no ImageNet "
                       "normalization)")
    group.add_argument("--no-pickle", action="store_true", help="refuse whole pickled models (they run code when loaded)")
    add_code_option(group)
    group.add_argument("--dataset", default=d.dataset, help=f"one of {', '.join(list_datasets())}, or folder:PATH")
    group.add_argument("--data-root", default=None, help="directory with the dataset's files (mnist: optional)")
    group.add_argument("--calib-size", type=positive_int("--calib-size"), default=d.calib_size,
                       help="calibration images (a random choice, by --seed)")
    group.add_argument("--calib-split", default=d.calib_split, choices=["train", "val"],
                       help="calibrate on the training split, or (flattering) on the evaluation images")
    limit = "evaluate on" if evaluates else "with --calib-split val, calibrate from"
    group.add_argument("--limit", type=positive_int("--limit"), default=None, help=f"{limit} the first N evaluation "
                       f"images (of a class-sorted split such as ImageFolder's: N evenly spaced ones)")
    group.add_argument("--batch-size", type=positive_int("--batch-size"), default=d.batch_size, help="images per batch")
    group.add_argument("--seed", type=random_seed, default=d.seed, help="seed for data order and any randomness")
    add_workers_option(group.add_argument)
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")


def add_conversion(parser: argparse.ArgumentParser) -> None:
    c = ConversionConfig()
    group = parser.add_argument_group("conversion")
    group.add_argument("--n", type=positive_int("--n", MAX_N), default=c.n,
                       help=f"thresholds per neuron (1..{MAX_N})")
    group.add_argument("--T", type=positive_int("--T"), default=None,
                       help="time steps (default: 4, or the T of an --snn file)")
    group.add_argument("--policy", type=policy_value, default=c.policy,
                       help=f"threshold policy: {', '.join(POLICIES)}, or a percentile such as 99.99; "
                            f"per-site overrides after commas: 'opt,*.mix_in0=999' (fnmatch on site names)")
    group.add_argument("--neuron", default=c.neuron, choices=NEURONS, help="hmt, if (n = 1) or mt (prior work)")
    group.add_argument("--identity", default=c.identity, choices=IDENTITIES,
                       help="none: only ReLUs spike; maxpool: also the y = x sites of moved max pooling; "
                            "all: a signed neuron before every Conv/Linear and attention matmul (ViT); "
                            "linear: before every Conv/Linear only")
    group.add_argument("--communicate", action=argparse.BooleanOptionalAction, default=c.communicate,
                       help="eq. 21 communication between the Pos and Neg halves of signed neurons")
    group.add_argument("--granularity", default=c.granularity, choices=GRANULARITIES, help="one threshold per layer or per channel")


def data_options(args: argparse.Namespace) -> DataOptions:
    return DataOptions(dataset=args.dataset, data_root=args.data_root, calib_size=args.calib_size,
                       calib_split=args.calib_split, limit=args.limit, batch_size=args.batch_size, seed=args.seed,
                       workers=args.workers)


def conversion_kwargs(args: argparse.Namespace) -> dict:
    return dict(n=args.n, T=args.T or DEFAULT_T, policy=args.policy, neuron=args.neuron, identity=args.identity,
                communicate=args.communicate, granularity=args.granularity)


def changed_conversion_options(args: argparse.Namespace) -> list[str]:
    """The conversion options other than --T that differ from their defaults, as typed ("--n 8")."""
    default = ConversionConfig()
    return ["--no-communicate" if name == "communicate" else f"--{name} {getattr(args, name)}"
            for name in FIXED_BY_SNN if getattr(args, name) != getattr(default, name)]


def check_outputs_apart(outputs: dict[str, Path | None], inputs: dict[str, str | list[str] | None]) -> None:
    """A UserError where an output would be written over a file the run reads or another output
    (``--out`` over the ``--model`` file, ``--json`` and ``--plot`` on one path): it would be lost."""
    taken: dict[Path, str] = {}
    for option, values in inputs.items():
        for value in values if isinstance(values, list) else [values]:
            if value and Path(value).is_file():
                taken[Path(value).resolve()] = f"the {option} file"
    for option, path in outputs.items():
        if path is None:
            continue
        if path.resolve() in taken:
            raise UserError(f"{option} {path} is {taken[path.resolve()]}: writing it would destroy that; choose "
                            f"another path")
        taken[path.resolve()] = f"where {option} goes"


def ensure_writable(path: Path) -> None:
    """Raise a UserError now, not after a long run, if ``path`` is a directory or its directory
    cannot be created or written. Creates nothing: the writer makes the missing folders, so a run
    that fails first leaves none behind."""
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a directory; give a file name")
    existing = path.parent.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from error
