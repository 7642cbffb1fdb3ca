"""User-facing errors: one clear line naming the file/field and what was expected."""


class MinitronError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits 1."""


class Stopped(MinitronError):
    """A run stopped on request (SIGTERM / SIGUSR1) after saving: not a failure. The CLI prints
    the line and exits 0; rerunning the same command resumes."""
