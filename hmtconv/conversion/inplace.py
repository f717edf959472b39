"""Calls that write over their first operand: ``x.mul_(2)`` and other ``*_`` methods. (fx records
``x += y`` as ``x + y``: its proxies have no in-place operators.)"""
from __future__ import annotations


def in_place(target) -> bool:
    """Whether a call to ``target`` (an fx node's) writes over its first operand."""
    return isinstance(target, str) and target.endswith("_") and not target.endswith("__")


def out_of_place(target):
    """The call ``target`` stands for, without the write: ``mul`` for ``mul_``."""
    return target[:-1] if isinstance(target, str) else target
