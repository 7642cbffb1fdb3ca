"""User-facing errors: one clear line naming the file/field and what was expected."""


class MinitronError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits 1."""
