"""The `gpuledger` command line.

Errors a user can act on are printed as one line on stderr, without a traceback, and
the process exits non-zero: 2 for bad input, 3 for an unreachable or failed service,
1 otherwise. Set GPULEDGER_DEBUG=1 to see tracebacks of unexpected failures.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import typer
from typer._click import exceptions as click_errors  # typer >= 0.2x vendors click

from models.errors import GpuledgerError
from pipelines.cli.app import app

__all__ = ["app", "main"]


def _fail(message: str, code: int) -> int:
    print(f"gpuledger: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gpuledger` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=args, prog_name="gpuledger", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        if exc.ctx is not None:
            print(exc.ctx.get_help())
        return 0
    except click_errors.UsageError as exc:
        path = exc.ctx.command_path if exc.ctx is not None else "gpuledger"
        return _fail(f"{exc.format_message()} (see {path} --help)", exc.exit_code)
    except typer.TyperException as exc:
        return _fail(exc.format_message(), exc.exit_code)
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return _fail("interrupted", 130)
    except GpuledgerError as exc:
        return _fail(exc.message, exc.exit_code)
    except Exception as exc:
        if os.environ.get("GPULEDGER_DEBUG"):
            raise
        return _fail(
            f"unexpected {type(exc).__name__}: {exc} (set GPULEDGER_DEBUG=1 for a traceback)", 1
        )
    return result if isinstance(result, int) else 0


def console_main() -> None:
    sys.exit(main())
