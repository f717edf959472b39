"""keep_freed_memory: after it, re-allocating a freed 64 MiB tensor costs no page faults (glibc);
the CLI calls it and HMTCONV_KEEP_MEMORY=0 opts out."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

from hmtconv.allocator import keep_freed_memory

cli_main = import_module("hmtconv.cli.main")
pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

CHILD = """
import json, resource, torch
from hmtconv.allocator import keep_freed_memory

def faults():
    counts = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(16 * 2**20)  # 64 MiB, touched
        del x
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

default = faults()
print(json.dumps({"default": default, "kept": keep_freed_memory(), "after": faults()}))
"""


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif((THP.exists() and "[always]" in THP.read_text())
                    or any(k.startswith("MALLOC_") for k in os.environ),
                    reason="counts 4 KiB page faults under glibc's default malloc settings (huge pages or MALLOC_* "
                           "variables change them)")
def test_freed_tensors_come_back_without_page_faults():
    """In a fresh process (the setting is process-wide): glibc unmaps a 64 MiB block at free, so
    each new one faults its 16,384 pages in again; once kept, the grown heap is reused as it is."""
    out = json.loads(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["kept"]
    assert min(out["default"][4:]) > 10_000
    assert max(out["after"][4:]) < 1_000


def test_opt_out_by_environment(monkeypatch):
    monkeypatch.setenv("HMTCONV_KEEP_MEMORY", "0")
    assert not keep_freed_memory()


def test_the_cli_keeps_freed_memory(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli_main, "keep_freed_memory", lambda: calls.append(True))
    assert cli_main.main(["evaluate", "--model", "/nonexistent.pt", "--dataset", "mnist"]) == 2
    assert calls == [True] and "is not a file" in capsys.readouterr().err
