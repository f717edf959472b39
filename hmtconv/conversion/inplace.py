"""Calls that write over their first operand: ``x.mul_(2)`` and other ``*_`` methods, ``x += y``."""
from __future__ import annotations

import operator

# The in-place operators and the out-of-place ones they stand for.
IN_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv}


def in_place(target) -> bool:
    """Whether a call to ``target`` (an fx node's) writes over its first operand."""
    return target in IN_PLACE_OPERATORS or (isinstance(target, str) and target.endswith("_")
                                            and not target.endswith("__"))


def out_of_place(target):
    """The call ``target`` stands for, without the write: ``mul`` for ``mul_``, ``+`` for ``+=``."""
    return IN_PLACE_OPERATORS.get(target, target[:-1] if isinstance(target, str) else target)
