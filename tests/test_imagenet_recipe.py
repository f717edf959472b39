"""experiments/imagenet/: the paper's settings, checked end to end on fake data at tiny size.

Each config is read as written (unknown keys would fail), then run on torchvision FakeData
(3x32x32, a few images, random weights instead of a download, CPU) with its first grid point at
T = 2 (marked slow), and table1's first model through real torchrun with 2 processes (in CI).
The full runs need ImageNet and a GPU.
"""
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from hmtconv.cli import main
from hmtconv.sweep import load_config

RECIPE = Path(__file__).resolve().parents[1] / "experiments" / "imagenet"
CONFIGS = sorted(RECIPE.glob("*.toml"))
PAPER = {  # what the paper's tables need from each config (grid values that must be present)
    "table1": {"n": [4], "T": [2, 4, 8, 16], "policy": ["opt", "999"]},
    "table1-identity": {"n": [4], "T": [16], "identity": ["maxpool"]},
    "table2": {"n": [8], "T": [2, 4], "policy": ["opt", "999", "999x2"]},
    "table3": {"n": [3], "T": [2, 4, 8, 16], "policy": ["opt"]},
    "table4": {"n": [4], "T": [16], "policy": ["opt", "999"], "identity": ["all"], "communicate": [True, False]},
}


def test_every_table_has_a_config_with_the_papers_settings():
    assert sorted(c.stem for c in CONFIGS) == sorted(PAPER)
    for path in CONFIGS:
        config = load_config(path)
        assert config.data.dataset == "imagenet" and config.device == "cuda"
        for key, values in PAPER[path.stem].items():
            assert set(values) <= set(getattr(config, key)), (path.name, key)
        models = {m.model for m in config.models}
        assert models == ({"timm:vit_base_patch16_224"} if path.stem == "table4" else {"resnet18", "resnet34", "vgg16_bn"})


def tiny_copy(path: Path, tmp_path: Path, models: int | None = 1) -> Path:
    """The config with fake data, random weights, its first model(s) and first grid point at T = 2."""
    raw = tomllib.loads(path.read_text())
    grid = {key: [values[0]] for key, values in raw["grid"].items()} | {"T": [2]}
    lines = [f'out = "{tmp_path / path.stem}"', 'device = "cpu"', "[data]", 'dataset = "fake"', "calib_size = 8",
             "limit = 8", "batch_size = 4", "[grid]"]
    lines += [f"{key} = {json.dumps(values)}" for key, values in grid.items()]
    for model in raw["models"][:models]:
        lines += ["[[models]]", f'name = "{model["name"]}"', f'model = "{model["model"]}"']
    copy = tmp_path / path.name
    copy.write_text("\n".join(lines) + "\n")
    return copy


@pytest.mark.slow  # every config with all three models; CI runs the torchrun check below
@pytest.mark.parametrize("path", [c for c in CONFIGS if c.stem != "table4"], ids=lambda p: p.stem)
def test_cnn_recipe_runs_on_fake_data(path, tmp_path):
    assert main(["sweep", str(tiny_copy(path, tmp_path, models=None)), "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp_path / path.stem / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in records} == {"resnet18", "resnet34", "vgg16_bn"}
    assert all(r["result"]["samples"] == 8 and len(r["result"]["snn_accuracy"]) == 2 for r in records)


@pytest.mark.slow
def test_vit_recipe_runs_on_fake_data(tmp_path):
    copy = tiny_copy(RECIPE / "table4.toml", tmp_path)
    copy.write_text(copy.read_text().replace('model = "timm:vit_base_patch16_224"',
                                             'model = "timm:vit_tiny_patch16_224"'))  # same family, CPU-sized
    assert main(["sweep", str(copy), "--no-progress"]) == 0


def test_recipe_under_torchrun(tmp_path):
    """The small version for CI: table1's first model (resnet18), 2 processes."""
    copy = tiny_copy(RECIPE / "table1.toml", tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          "-m", "hmtconv", "sweep", str(copy), "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    records = (tmp_path / "table1" / "results.jsonl").read_text().splitlines()
    assert len(records) == 1 and json.loads(records[0])["result"]["samples"] == 8
