"""Every file hmtconv writes goes through ``atomic_path``: the usual file mode, nothing left behind."""
import os
import stat

import pytest
import torch
from torch import nn

import hmtconv.conversion as hc
from hmtconv.atomic import atomic_path
from hmtconv.errors import UserError
from hmtconv.models import save_checkpoint
from hmtconv.report import atomic_write_json, plot_curves
from hmtconv.report.plots import plot_format
from hmtconv.snn_io import save_snn

CURVES = {"opt": {"ann_accuracy": 99.0, "snn_accuracy": [95.0, 98.0], "energy_ratio": [0.1, 0.2]}}


def tiny_snn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    return hc.convert(model, [(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))], T=2)


WRITERS = {
    "json": ("r.json", lambda path: atomic_write_json(path, {"a": 1})),
    "plot": ("c.png", lambda path: plot_curves(CURVES, path)),
    "snn": ("s.safetensors", lambda path: save_snn(tiny_snn(), path, model="vgg_small", num_classes=3)),
    "checkpoint": ("m.pt", lambda path: save_checkpoint(path, nn.Linear(2, 2), "vgg_small", {}, {})),
}


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


@pytest.mark.parametrize("kind", WRITERS)
def test_files_get_the_mode_open_gives_and_keep_an_existing_files_mode(kind, tmp_path, umask_027):
    name, write = WRITERS[kind]
    path = tmp_path / name
    write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # 0o666 less the umask, not mkstemp's 0o600
    path.chmod(0o604)
    write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o604
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


def test_temporary_path_keeps_the_suffix_and_goes_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.tar.gz") as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".gz"
            raise RuntimeError
    with atomic_path(tmp_path / ".hidden") as tmp:
        assert tmp.suffix == ""
    assert [p.name for p in tmp_path.iterdir()] == [".hidden"]


def test_a_plot_without_a_suffix_is_png_and_an_unknown_suffix_is_refused(tmp_path):
    plot_curves(CURVES, tmp_path / "curves")
    assert (tmp_path / "curves").read_bytes()[:4] == b"\x89PNG"
    plot_curves(CURVES, tmp_path / "curves.SVG")
    assert b"<svg" in (tmp_path / "curves.SVG").read_bytes()[:500]
    with pytest.raises(UserError, match=r"cannot plot to .*out\.txt: matplotlib cannot write \.txt files"):
        plot_format(tmp_path / "out.txt")
