"""The one exception type for problems the user can fix (bad names, missing files, mismatches)."""


class UserError(ValueError):
    """A problem with the user's input; the CLI prints it as one line and exits with status 2."""
