"""The sites of the SNN file ``load_snn`` rebuilds, for the passes that place sites.

A file written by an earlier version may hold sites this one would not put (a y = x site before a
layer fed spikes through a view or a dropout; module swapping's sites from before it gave a site
per call and moved max pooling): while ``rebuilding(names)`` is active, ``prepare`` puts
the saved ones back, so the file loads as it was converted."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_SAVED: ContextVar[frozenset[str]] = ContextVar("saved_sites", default=frozenset())


@contextmanager
def rebuilding(names: Iterable[str]) -> Iterator[None]:
    token = _SAVED.set(frozenset(names))
    try:
        yield
    finally:
        _SAVED.reset(token)


def saved_sites() -> frozenset[str]:
    """The saved SNN's site names (empty outside ``rebuilding``: a new conversion)."""
    return _SAVED.get()
