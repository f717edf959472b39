"""``--code FILE.py``: whole pickled models whose classes live in the saving script or its own modules."""
import json
import subprocess
import sys

import pytest

from hmtconv.cli import main
from hmtconv.models import user_code

SMALL = ["--dataset", "mnist", "--limit", "32", "--calib-size", "16", "--batch-size", "16", "--T", "2",
         "--no-progress", "--no-diagnostics"]
NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 13 * 13, 10)

    def forward(self, x):
        return self.fc(torch.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))
"""


@pytest.fixture(autouse=True)
def fresh_imports(monkeypatch):
    """Each test imports its files anew and leaves no module behind."""
    monkeypatch.setattr(user_code, "IMPORTED", [])
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def save_from_script(tmp_path, script: str, files: dict[str, str]) -> None:
    """Run ``script`` as a program (``python script.py``), so its classes are pickled as it names them."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    subprocess.run([sys.executable, script], cwd=tmp_path, check=True)


def test_classes_defined_in_the_saving_script(tmp_path, capsys):
    save = NET + "\nif __name__ == '__main__':\n    torch.manual_seed(0)\n    torch.save(Net(), 'model.pt')\n"
    save_from_script(tmp_path, "train_here.py", {"train_here.py": save})
    model, out = str(tmp_path / "model.pt"), tmp_path / "out.json"
    assert main(["evaluate", "--model", model, *SMALL]) == 2
    err = capsys.readouterr().err
    assert "class Net was defined in the script that saved it" in err and "--code" in err
    assert main(["evaluate", "--model", model, "--code", str(tmp_path / "train_here.py"), *SMALL,
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["model"].endswith("(Net)")


def test_classes_imported_by_the_saving_script_from_its_own_module(tmp_path, capsys):
    save = "import torch\nfrom nets_here import Net\ntorch.save(Net(), 'model.pt')\n"
    save_from_script(tmp_path, "save.py", {"nets_here.py": NET, "save.py": save})
    model = str(tmp_path / "model.pt")
    assert main(["evaluate", "--model", model, *SMALL]) == 2
    assert "module 'nets_here', which is not importable here: pass its file with --code nets_here.py" \
        in capsys.readouterr().err
    assert main(["evaluate", "--model", model, "--code", str(tmp_path / "nets_here.py"), *SMALL]) == 0


@pytest.mark.parametrize("name, text, message", [
    ("absent.py", None, "no such file"),
    ("notes.txt", "", "not a Python file"),
    ("broken_here.py", "raise RuntimeError('boom')", "failed while being imported: RuntimeError('boom')"),
    ("json.py", "", "a module named 'json' is already loaded"),
])
def test_bad_code_files_are_named(tmp_path, capsys, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    assert main(["evaluate", "--model", "vgg_small", "--code", str(tmp_path / name), *SMALL]) == 2
    err = capsys.readouterr().err
    assert f"--code {tmp_path / name}" in err and message in err


def test_a_class_its_module_no_longer_defines_is_named(tmp_path, capsys):
    import types

    import torch
    from torch import nn

    module = sys.modules["gone_here"] = types.ModuleType("gone_here")
    module.Gone = type("Gone", (nn.Linear,), {"__module__": "gone_here"})
    torch.save(module.Gone(2, 2), tmp_path / "model.pt")
    del module.Gone
    assert main(["evaluate", "--model", str(tmp_path / "model.pt"), *SMALL]) == 2
    assert "it needs gone_here.Gone, which that module does not define" in capsys.readouterr().err


def test_evaluate_snn_imports_the_code_convert_was_given(tmp_path, capsys):
    """`convert --code F` records F in the SNN file; `evaluate --snn` (a new process, here: the
    module forgotten) imports it again, and says which file it cannot find and what to pass."""
    save = NET + "\nif __name__ == '__main__':\n    torch.manual_seed(0)\n    torch.save(Net(), 'model.pt')\n"
    save_from_script(tmp_path, "train_snn.py", {"train_snn.py": save})
    code, snn = tmp_path / "train_snn.py", str(tmp_path / "net.safetensors")
    assert main(["convert", "--model", str(tmp_path / "model.pt"), "--code", str(code), *SMALL[:-2], "--out", snn]) == 0
    for forget in range(2):
        user_code.IMPORTED.clear()
        del sys.modules["train_snn"]
        if forget:
            code.rename(tmp_path / "moved.py")
        assert main(["evaluate", "--snn", snn, *SMALL]) == 2 * forget
        err = capsys.readouterr().err
        assert f"importing {code}, the --code of `hmtconv convert`" in err
        if forget:
            assert f"converted with --code {code}: --code {code}: no such file" in err and "pass the files" in err
