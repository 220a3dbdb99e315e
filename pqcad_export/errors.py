"""User-facing errors: the CLI prints their message as one line and exits 1 (or 2 for bad usage)."""


class PqcadError(Exception):
    """A failure the tool can explain in one line (bad artifact, NaN, missing backend...)."""

    exit_code = 1


class UsageError(PqcadError):
    """Bad command-line input (wrong --bits, unknown backend...)."""

    exit_code = 2
