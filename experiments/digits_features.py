"""Build (or load) the digits feature network of ``eval.fid.features=digits`` and print its accuracy.

    python experiments/digits_features.py [--force] [--cache-dir DIR]

Trains the small CNN of ``cnf.quality.digits`` on the training split of the
8×8 digits (CPU, one thread, deterministic) unless its weights are already
cached (``$CNF_CACHE``, default ``~/.cache/cnf``; --force retrains) and prints
one JSON line: train/val/test accuracy, training seconds, the cache file and
whether this call trained it.
"""

from __future__ import annotations

import argparse
import json
import sys

import _cli

from cnf.quality.digits import load_digits_classifier


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    parser.add_argument("--cache-dir", help="cache folder (default $CNF_CACHE or ~/.cache/cnf)")
    args = parser.parse_args()
    _cli.setup_threads()
    _, info = load_digits_classifier(
        cache_dir=args.cache_dir,
        force=args.force,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    keys = ("test_accuracy", "val_accuracy", "train_accuracy", "train_seconds", "trained", "path")
    out = {k: info[k] for k in keys}
    out["recipe"] = info["recipe"]
    how = "trained now" if info["trained"] else "loaded from the cache; it trained"
    print(
        f"digits classifier: test accuracy {info['test_accuracy']:.4f} (359 held-out images); "
        f"{how} in {info['train_seconds']:.1f} s",
        file=sys.stderr,
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
