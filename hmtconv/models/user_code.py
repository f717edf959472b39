"""``--code FILE.py``: the Python files that define the classes of a whole pickled model.

``torch.save(model)`` stores classes by reference: ``__main__.Net`` when the training script
defined them, ``models.Net`` when it imported them from its own ``models.py``. Another program
cannot load such a file until that code is importable. ``import_code`` imports the files (each as
a module named after it; their ``if __name__ == "__main__":`` blocks do not run, everything else
does) and ``UNPICKLER`` resolves ``__main__.X`` from them.
"""
from __future__ import annotations

import importlib.util
import pickle
import re
import sys
import types
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError

IMPORTED: list[types.ModuleType] = []  # by import_code, latest last


def import_code(paths: Iterable[str | Path]) -> None:
    """Import each Python file as the module its name says (``train.py``: ``train``)."""
    for path in map(Path, paths):
        if not path.is_file():
            raise UserError(f"--code {path}: no such file")
        if path.suffix != ".py" or not path.stem.isidentifier():
            raise UserError(f"--code {path}: not a Python file with an importable name (like train.py)")
        loaded = sys.modules.get(path.stem)
        if loaded is not None:
            if Path(getattr(loaded, "__file__", None) or "").resolve() != path.resolve():
                raise UserError(f"--code {path}: a module named {path.stem!r} is already loaded "
                                f"({getattr(loaded, '__file__', None) or 'built in'}); rename the file")
            IMPORTED.append(loaded)
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module  # before running it: pickled references name this module
        if str(path.parent.resolve()) not in sys.path:  # so the file's imports of its neighbours work
            sys.path.insert(0, str(path.parent.resolve()))
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[path.stem]
            raise UserError(f"--code {path} failed while being imported: {error!r}") from error
        IMPORTED.append(module)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "__main__":  # the saving script's own classes, from the files given with --code
            for code in reversed(IMPORTED):
                if hasattr(code, name):
                    return getattr(code, name)
        return super().find_class(module, name)


# What torch.load takes as ``pickle_module`` (it subclasses ``Unpickler``, reads ``__name__``).
UNPICKLER = types.SimpleNamespace(__name__="hmtconv.models.user_code", Unpickler=_Unpickler, load=pickle.load)


def missing_code_hint(error: BaseException) -> str | None:
    """What to do when unpickling failed for want of the saving program's classes, else None."""
    missing = re.search(r"Can't get attribute '([^']*)' on <module '([^']*)'", str(error))
    if isinstance(error, AttributeError) and missing:
        name, module = missing.groups()
        if not module.endswith("__main__"):  # (the running program's __main__ is pytest's under pytest)
            return f"it needs {module}.{name}, which that module does not define (its code changed since?)"
        return (f"it holds a model whose class {name} was defined in the script that saved it; pass that "
                f"script with --code FILE.py (it is imported: code under `if __name__ == \"__main__\":` does not run)")
    if isinstance(error, ModuleNotFoundError) and error.name:
        fix = ("add the directory holding it to PYTHONPATH" if "." in error.name
               else f"pass its file with --code {error.name}.py, or add its directory to PYTHONPATH")
        return f"it holds a model whose classes come from module {error.name!r}, which is not importable here: {fix}"
    return None
