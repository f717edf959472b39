"""The one exception type for problems the user can fix (bad names, missing files, mismatches),
and the one check of integer arguments."""
import operator


class UserError(ValueError):
    """A problem with the user's input; the CLI prints it as one line and exits with status 2."""


def whole_number(value, what: str, low: int = 1, high: int | None = None) -> int:
    """``value`` as a Python int if it is an integer (``np.int64`` too, not a bool or float) in
    ``[low, high]``; else a ValueError that names ``what`` and the range."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        rule = (f"an integer in [{low}, {high}]" if high is not None else "a positive integer" if low == 1
                else f"an integer >= {low}")
        raise ValueError(f"{what} must be {rule}, got {value!r}")
    return number
