"""Errors a user can act on.

Every error names the input, the field and what was expected, in one line; the CLI
prints `message` without a traceback and exits with `exit_code`.
"""


class GpuledgerError(Exception):
    """Base for errors reported to the user as one line."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InputError(GpuledgerError):
    """Bad input: a CLI value, a config file, a trace file, a record."""

    exit_code = 2


class ServiceError(GpuledgerError):
    """A service (Kafka, Prometheus, a local process) is unreachable or failed."""

    exit_code = 3
