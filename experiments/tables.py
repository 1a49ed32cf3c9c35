"""Build a result table from finished run folders, with published numbers beside ours.

    python experiments/tables.py TABLE.yaml [--runs-root DIR] [--out DIR]

TABLE.yaml is a table spec (``configs/tables/``; format in ``cnf/tables.py``).
Runs are matched on their resolved ``config.yaml`` values (rows and columns
carry dotted ``key: value`` filters), aggregated over seeds (mean ± std, n
shown) from ``final.json``. Writes ``<out>/<name>.md`` and ``<out>/<name>.tex``
(booktabs), prints the markdown and lists runs that are missing (no folder) or
unfinished (no usable ``final.json``). Unverified published numbers carry a †,
numbers measured on this machine a ‡.

Defaults: --runs-root = the spec's ``runs_root`` (``runs``), --out =
<runs-root>/tables. Exit codes: 0 table written (even with missing runs),
2 bad spec or arguments.

Example:
    python experiments/sweep.py configs/sweeps/ffjord_toy.yaml --local --jobs 2
    python experiments/tables.py configs/tables/ffjord_toy.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _cli
from reporting import render_latex, render_markdown

from cnf.tables import build_table, load_table_spec
from cnf.train.checkpoint import atomic_write_text


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("spec", metavar="TABLE.yaml")
    parser.add_argument("--runs-root", help="folder the spec's run patterns are relative to")
    parser.add_argument("--out", help="output folder (default: <runs-root>/tables)")
    args = parser.parse_args()

    spec = load_table_spec(args.spec)
    root = Path(args.runs_root or spec.runs_root)
    table = build_table(spec, root)
    markdown = render_markdown(table)
    out = Path(args.out) if args.out else root / "tables"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{spec.name}.md", markdown)
    atomic_write_text(out / f"{spec.name}.tex", render_latex(table))
    print(markdown)
    n_missing, n_unfinished = len(table.missing), len(table.unfinished)
    print(
        f"written to {out / spec.name}.{{md,tex}}"
        + (
            f" ({n_missing} missing, {n_unfinished} unfinished)"
            if n_missing or n_unfinished
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
