"""Building and loading the compiled CPU kernels (hmtconv.native): cached once, atomically, and a
clean fallback with one warning where no compiler works."""
from __future__ import annotations

import shutil
from pathlib import Path
import warnings

import pytest

from hmtconv import native
from hmtconv.cache import cache_dir
from hmtconv.conversion import compensation_kernel, matmul_kernel, observer_kernel
from hmtconv.neurons import cpu_kernel

SOURCES = [cpu_kernel.SOURCE, observer_kernel.SOURCE, compensation_kernel.SOURCE, matmul_kernel.SOURCE]
needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler: the kernels fall back to their tensor paths")


@needs_compiler
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_each_kernel_builds_once_into_the_cache(source, tmp_path, monkeypatch):
    monkeypatch.setenv("HMTCONV_CACHE", str(tmp_path))
    flags, cpu = native.candidate_flags()[0]
    compiler = shutil.which("cc") or shutil.which("gcc")
    first = native.build(source, compiler, flags, cpu)
    stamp = first.stat().st_mtime_ns
    assert native.build(source, compiler, flags, cpu) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind
    assert first.name.startswith(source.stem + "-")


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_a_compiler_that_fails_every_build_leaves_the_tensor_path_with_a_warning(source, tmp_path, monkeypatch):
    monkeypatch.setenv("HMTCONV_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits 1 for every set of flags
    with pytest.warns(UserWarning, match=f"building {source.name} with false failed, so neurons run on the slower"):
        assert native.load.__wrapped__(source, "neurons run") is None
    assert list(tmp_path.iterdir()) == []  # no partial library left in the cache


def test_without_a_compiler_the_kernels_warn_and_keep_the_tensor_path(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="no C compiler found, so observers run on the slower tensor path"):
        assert native.load.__wrapped__(observer_kernel.SOURCE, "observers run") is None


@needs_compiler
def test_a_compiler_command_with_arguments_in_cc_builds(tmp_path, monkeypatch):
    """$CC is a command line by convention ("ccache gcc", "gcc -m64"); it was run as one file name,
    so every build failed and the neurons fell back to the tensor path."""
    monkeypatch.setenv("HMTCONV_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", f"{shutil.which('cc') or shutil.which('gcc')} -DHMTCONV_TEST=1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load.__wrapped__(cpu_kernel.SOURCE, "neurons run") is not None


def test_a_relative_cache_is_taken_from_the_current_directory(monkeypatch, tmp_path):
    """dlopen of a bare file name searches the library path: ``HMTCONV_CACHE=.`` turned every kernel
    off (and the warning said the build failed)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HMTCONV_CACHE", ".")
    assert cache_dir() == tmp_path
    monkeypatch.setenv("HMTCONV_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "hmtconv"
