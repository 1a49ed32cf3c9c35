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
from cnf.quality import FeatureError  # noqa: E402
from cnf.rundir import RunFolderError  # noqa: E402
from cnf.settings import SettingsError  # noqa: E402
from cnf.train.loop import NonFiniteError  # noqa: E402

USER_ERRORS = (ConfigError, DataError, FeatureError, RunFolderError, SettingsError)


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


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Config overrides (``eval.solver.rtol=1e-7``) and flat sampling-settings keys (``sampler=heun``).

    A key whose first part is a section of the run config (``eval``, ``model``,
    ``device``, ...) changes the config; any other key (``sampler``, ``steps``,
    ``grid``, ``method``, ``solver.rtol``, ...) is a setting of the model's
    typed ``Settings``, as in a cost grid (values typed as there).
    """
    import dataclasses

    from cnf.cost import normalize_cost_grid
    from cnf.schema import Config

    sections = {f.name for f in dataclasses.fields(Config)}
    config: list[str] = []
    settings: dict[str, Any] = {}
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{o}' must be key=value")
        if key.strip().split(".")[0] in sections:
            config.append(o)
        else:
            settings[key.strip()] = value.strip()
    if settings:
        settings = normalize_cost_grid([settings], source="sampling settings")[0]
    return config, settings


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
