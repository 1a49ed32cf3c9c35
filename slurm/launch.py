"""SLURM for sweeps: validate the ``slurm:`` section, render the sbatch script, submit it.

The library (:mod:`cnf.sweep`) expands a sweep into runs and writes the run
manifest; this module, outside the library, turns the manifest into a job
array: one array task per run (``array.sbatch.tmpl``), or a data-parallel
``srun`` + ``torchrun`` job per run (``ddp.sbatch.tmpl``). Every value that
reaches the script is validated here and shell-quoted; the runs' overrides
never pass through the shell (each task reads its line of the manifest).
"""

from __future__ import annotations

import re
import shlex
import string
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnf.sweep import SweepError

__all__ = ["SlurmError", "SlurmSpec", "array_spec", "parse_slurm", "render_sbatch", "submit"]

TEMPLATES = Path(__file__).resolve().parent


class SlurmError(SweepError):
    """A ``slurm:`` section or a submission that cannot be used (one-line message)."""


# YAML reads an unquoted 4:00:00 as the base-60 integer 14400: refuse such values
# in the raw text, where they can still be told from a number of minutes.
_SEXAGESIMAL_TIME_RE = re.compile(r"\btime:[ \t]*(\d+(?::\d+)+)")


def check_time_quoted(text: str, where: str) -> None:
    """Refuse an unquoted ``time: H:MM:SS`` in a sweep file's text (YAML would make it a number)."""
    m = _SEXAGESIMAL_TIME_RE.search(text)
    if m:
        value = m.group(1)
        raise SlurmError(
            f"{where}: slurm.time: quote it (time: \"{value}\"); YAML reads {value} as a number of seconds"
        )


_TIME_RE = re.compile(
    r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}|\d+-\d{1,2}:\d{1,2}"
    r"|\d+-\d{1,2}:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)$"
)
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SLURM_WORD_RE = re.compile(r"^[A-Za-z0-9_.,:+-]+$")  # partition / account / qos / gres
_EXTRA_RE = re.compile(r"^--[a-z][a-z0-9-]*(=.*)?$")



@dataclass(frozen=True)
class SlurmSpec:
    """The ``slurm:`` section: resources of every array task.

    ``gpus`` and ``nproc_per_node`` are per node. With more than one process
    per node or more than one node, each task is a data-parallel job
    (``slurm/ddp.sbatch.tmpl``: ``srun`` + ``torchrun``); otherwise one process
    per task (``slurm/array.sbatch.tmpl``). ``setup`` lines (``module load``,
    ``source venv/bin/activate``) are shell commands and go into the script as
    written; everything else is validated and quoted.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gres: str | None = None  # e.g. gpu:a100:1; default gpu:<gpus> when gpus > 0
    gpus: int = 0  # GPUs per node
    nproc_per_node: int | None = None  # training processes per node; default max(gpus, 1)
    nodes: int = 1
    cpus_per_task: int = 1  # CPUs per node-task (shared by its processes)
    mem: str | None = None  # per node, e.g. 16G or 4000M
    time: str | None = None  # e.g. 04:00:00 or 1-00:00:00
    array_throttle: int = 0  # at most this many tasks at once; 0 = no limit
    signal_grace: int = 120  # seconds before the time limit at which USR1 arrives
    setup: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()  # more sbatch options, e.g. "--constraint=a100"
    job_name: str | None = None  # default: the sweep name
    python: str | None = None  # interpreter on the nodes; default: the one running sweep.py
    template: str = "auto"  # auto | array | ddp

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or max(self.gpus, 1)

    @property
    def kind(self) -> str:
        """Which template: ``ddp`` for multi-process or multi-node tasks, else ``array``."""
        if self.template != "auto":
            return self.template
        return "ddp" if self.nodes > 1 or self.procs_per_node > 1 else "array"


def parse_slurm(raw: Any, where: str) -> SlurmSpec:
    if raw is None:
        return SlurmSpec()
    if not isinstance(raw, Mapping):
        raise SlurmError(f"{where}: slurm must be a mapping of resources")
    known = SlurmSpec.__dataclass_fields__
    for key in raw:
        if key not in known:
            raise SlurmError(
                f"{where}: unknown key 'slurm.{key}'; valid: {', '.join(sorted(known))}"
            )
    kw: dict[str, Any] = {}

    def text(key: str, pattern: re.Pattern[str], hint: str) -> None:
        if raw.get(key) is None:
            return
        value = str(raw[key])
        if isinstance(raw[key], (bool, float)) or not pattern.match(value):
            raise SlurmError(f"{where}: slurm.{key}: {raw[key]!r} is not {hint}")
        kw[key] = value

    def integer(key: str, low: int, high: int | None = None) -> None:
        if raw.get(key) is None:
            return
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SlurmError(f"{where}: slurm.{key}: {value!r} is not an integer >= {low}")
        if high is not None and value > high:
            raise SlurmError(f"{where}: slurm.{key}: {value!r} is larger than {high}")
        kw[key] = value

    def lines(key: str, pattern: re.Pattern[str] | None, hint: str) -> None:
        if raw.get(key) is None:
            return
        value = raw[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SlurmError(f"{where}: slurm.{key} must be a list of strings")
        for v in value:
            if "\n" in v or "\r" in v or (pattern is not None and not pattern.match(v)):
                raise SlurmError(f"{where}: slurm.{key}: {v!r} is not {hint}")
        kw[key] = tuple(value)

    word = "a SLURM name (letters, digits, _ . , : + -)"
    text("partition", _SLURM_WORD_RE, word)
    text("account", _SLURM_WORD_RE, word)
    text("qos", _SLURM_WORD_RE, word)
    text("gres", _SLURM_WORD_RE, "a SLURM gres such as gpu:1 or gpu:a100:2")
    text("job_name", _NAME_RE, "a job name (letters, digits, . _ -)")
    text(
        "time",
        _TIME_RE,
        "a SLURM time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS; quote it in YAML)",
    )
    text("mem", _MEM_RE, "a SLURM memory size such as 4000M or 16G")
    integer("gpus", 0)
    integer("nproc_per_node", 1)
    integer("nodes", 1)
    integer("cpus_per_task", 1)
    integer("array_throttle", 0)
    integer("signal_grace", 1, 65535)
    lines("setup", None, "a shell line")
    lines("extra", _EXTRA_RE, "an sbatch option such as --constraint=a100")
    if raw.get("python") is not None:
        if not isinstance(raw["python"], str) or not raw["python"].strip():
            raise SlurmError(f"{where}: slurm.python must be the path of a Python interpreter")
        kw["python"] = raw["python"]
    if raw.get("template") is not None:
        if raw["template"] not in ("auto", "array", "ddp"):
            raise SlurmError(
                f"{where}: slurm.template: unknown value {raw['template']!r}; valid: auto, array, ddp"
            )
        kw["template"] = raw["template"]
    spec = SlurmSpec(**kw)
    if spec.gres and spec.gpus:
        raise SlurmError(f"{where}: give slurm.gres or slurm.gpus, not both")
    return spec



def array_spec(indices: Sequence[int], throttle: int = 0) -> str:
    """``0-3,7,9-10%2``: ranges compressed, ``%throttle`` appended when > 0."""
    if not indices:
        raise SlurmError("no runs to submit")
    idx = sorted(set(indices))
    parts, start, prev = [], idx[0], idx[0]
    for i in [*idx[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts) + (f"%{throttle}" if throttle else "")


class _Template(string.Template):
    # ``$`` belongs to the shell in these scripts; placeholders are @@{name}.
    delimiter = "@@"


def render_sbatch(
    template: str,
    sweep: Any,
    slurm: SlurmSpec,
    indices: Sequence[int],
    *,
    manifest: Path,
    workdir: Path,
    python: str,
    log_dir: Path,
) -> str:
    """Fill an sbatch template (``slurm/*.sbatch.tmpl``) for the array tasks ``indices``.

    Every value is passed through :func:`shlex.quote`, also in ``#SBATCH``
    lines (sbatch strips the quotes), except the sweep's ``setup`` lines, which
    are shell commands by design.
    """
    s = slurm
    q = shlex.quote
    opts: list[str] = []
    for key, flag in (
        ("partition", "--partition"),
        ("account", "--account"),
        ("qos", "--qos"),
        ("time", "--time"),
        ("mem", "--mem"),
    ):
        value = getattr(s, key)
        if value is not None:
            opts.append(f"#SBATCH {flag}={q(value)}")
    opts.append(f"#SBATCH --cpus-per-task={int(s.cpus_per_task)}")
    gres = s.gres or (f"gpu:{int(s.gpus)}" if s.gpus else None)
    if gres:
        opts.append(f"#SBATCH --gres={q(gres)}")
    for line in s.extra:
        flag, sep, value = line.partition("=")
        opts.append(f"#SBATCH {flag}{sep}{q(value)}" if sep else f"#SBATCH {flag}")
    mapping = {
        "sweep_name": q(sweep.name),
        "job_name": q(s.job_name or sweep.name),
        "array": q(array_spec(indices, s.array_throttle)),
        "log_file": q(str(log_dir / "%A_%a.out")),
        "signal": q(f"B:USR1@{int(s.signal_grace)}"),
        "nodes": str(int(s.nodes)),
        "nproc_per_node": str(int(s.procs_per_node)),
        "sbatch_options": "\n".join(opts),
        "setup": "\n".join(s.setup) if s.setup else "# (no setup lines)",
        "workdir": q(str(workdir)),
        "python": q(python),
        "manifest": q(str(manifest)),
    }
    try:
        return _Template(template).substitute(mapping)
    except (KeyError, ValueError) as e:
        raise SlurmError(f"sbatch template: bad or unknown placeholder {e}") from None


def submit(script: Path, *, timeout: float = 120) -> str:
    """``sbatch --parsable script``; the job id (raises :class:`SlurmError` with sbatch's message)."""
    try:
        out = subprocess.run(
            ["sbatch", "--parsable", str(script)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise SlurmError("sbatch not found: run --slurm on a SLURM login node") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"sbatch did not answer within {timeout:g} s") from None
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        raise SlurmError(f"sbatch failed: {msg[-1] if msg else f'exit {out.returncode}'}")
    return out.stdout.strip().split(";")[0]
