"""Shared command-line plumbing for the entry points: clear errors, signals, W&B."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

# The entry points run from a checkout without installation too.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import warnings  # noqa: E402

from cnf.config import ConfigError  # noqa: E402
from cnf.data import DataError  # noqa: E402
from cnf.rundir import RunFolderError  # noqa: E402
from cnf.settings import SettingsError  # noqa: E402
from cnf.train.loop import NonFiniteError  # noqa: E402

USER_ERRORS = (ConfigError, DataError, RunFolderError, SettingsError)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
    print(f"warning: {message}", file=sys.stderr if file is None else file)


# Warnings (e.g. a config key of the previous release) are one line, as errors are.
warnings.showwarning = _one_line_warning
EXIT_USAGE = 2
EXIT_NONFINITE = 1
EXIT_INTERRUPTED = 3


def fail(message: str, code: int = EXIT_USAGE) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def run_main(main: Callable[[], int | None]) -> None:
    """Run ``main`` turning user errors into one line on stderr and exit code 2."""
    try:
        code = main()
    except USER_ERRORS as e:
        fail(str(e), EXIT_USAGE)
    except NonFiniteError as e:
        fail(str(e), EXIT_NONFINITE)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    sys.exit(code or 0)


def install_stop_handlers(request_stop: Callable[[str], None]) -> None:
    """SIGTERM / SIGUSR1 (SLURM pre-emption) → checkpoint at the next iteration and exit."""

    def handler(signum: int, _frame: Any) -> None:
        request_stop(f"received {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, handler)


def setup_threads() -> None:
    # Two threads on a loaded 2-core machine can be 10x slower than one.
    if "OMP_NUM_THREADS" in os.environ:
        import torch

        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
