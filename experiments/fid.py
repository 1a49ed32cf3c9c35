"""FD (FID) and KID of a trained image model's samples against its training set.

    python experiments/fid.py RUN_DIR [--num-samples 50000] [--batch-size B] [--seed S]
        [--kid-subsets 100] [--kid-subset-size 1000] [--no-progress] [dotted.key=value ...]

``eval.fid.features=<digits|PATH>`` chooses the feature network: ``digits``
(the project's 8×8 digits classifier, trained offline on first use; the
default for data.name=digits) or the path of a TorchScript network called as
``detector(uint8 images, return_features=True)``, e.g. NVIDIA's
``inception-2015-12-05.pt`` for FID proper. Other overrides (``eval.solver.*``,
``model.sampler`` ...) change how the run samples, as for evaluate.py.

Samples come from ``run.model.sample(n, generator=...)`` in batches, with one
``torch.Generator`` seeded with --seed on the run's device (and the global RNG
seeded too): the same seed, batch size and settings give the same samples.
They are quantised to the data's grey levels (``cnf.quality.images``) before
the feature network sees them. The training set's reference statistics are
computed once and cached under ``$CNF_CACHE`` (default ``~/.cache/cnf``).

The last line of stdout is one JSON object: fid, kid, kid_stderr,
num_samples, features, feature_identity, iteration, seed, batch_size,
kid_subsets, kid_subset_size, sampling (the sampler settings), nfe_per_sample (if the model reports NFE),
finite_fraction, reference (images, cache file), dataset, run_dir, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import _cli
import numpy as np
import torch

from cnf.config import ConfigError
from cnf.data.images import IMAGE_DATASETS
from cnf.quality import (
    FeatureError,
    build_features,
    compute_features,
    feature_statistics,
    frechet_distance,
    kid,
    reference_statistics,
    samples_to_images,
)
from cnf.rundir import load_run
from cnf.settings import describe

FID_KEYS = ("features",)  # eval.fid.<key> understood here


def split_fid_overrides(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """``eval.fid.*`` overrides (as a dict) and the rest.

    The run config's schema has no ``eval.fid`` section yet (it is added with
    the families' FID wiring), so these keys are taken out here before the
    rest goes to ``load_run``.
    """
    fid, rest = {}, []
    for o in overrides:
        key, sep, value = o.partition("=")
        if key.startswith("eval.fid."):
            name = key[len("eval.fid.") :]
            if not sep or name not in FID_KEYS:
                valid = ", ".join(f"eval.fid.{k}=..." for k in FID_KEYS)
                raise ConfigError(f"unknown override '{o}'; valid: {valid}")
            fid[name] = value
        else:
            rest.append(o)
    return fid, rest


def sampling_settings(model: Any) -> dict[str, Any]:
    """The settings ``model.sample`` uses: the model's full typed settings, flattened."""
    return describe(model.settings)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (eval.fid.features, eval.*)")
    parser.add_argument("--num-samples", type=int, default=50_000, help="default 50000")
    parser.add_argument(
        "--batch-size", type=int, help="samples per batch (default eval.batch_size)"
    )
    parser.add_argument("--seed", type=int, help="sampling seed (default eval.seed)")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    parser.add_argument(
        "--kid-subset-size", type=int, default=1000, help="KID subset size (default 1000)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_intermixed_args()  # overrides before or after the options
    _cli.setup_threads()
    minimum = {"num_samples": 2, "batch_size": 1, "kid_subsets": 1, "kid_subset_size": 2}
    for name, low in minimum.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    fid_opts, overrides = split_fid_overrides(args.overrides)
    t0 = time.perf_counter()
    run = load_run(args.run_dir, overrides)
    cfg, data, model = run.cfg, run.data, run.model
    if data.kind != "image":
        raise ConfigError(
            f"fid.py needs an image data set; {run.run_dir} has data.name={data.name}"
        )
    spec = fid_opts.get("features", "digits" if data.name == "digits" else None)
    if spec is None:
        raise ConfigError(
            f"data.name={data.name} needs eval.fid.features=<path of a TorchScript feature "
            "network, e.g. inception-2015-12-05.pt>"
        )
    seed = cfg.eval.seed if args.seed is None else args.seed
    batch_size = args.batch_size or cfg.eval.batch_size
    progress = not args.no_progress
    device = model.device

    try:
        extractor = build_features(spec, device=device, progress=progress)
        extractor.check(data.image_shape)  # fail on a wrong network before any long work
        train = IMAGE_DATASETS[data.name](path=cfg.data.path, val_size=cfg.data.val_size).train
        ref = reference_statistics(
            extractor,
            train,
            num_levels=data.num_levels,
            dataset=data.name,
            batch_size=batch_size,
            progress=progress,
        )
        print(
            f"reference: {ref.num_images} training images, "
            f"{'loaded from' if ref.from_cache else 'cached in'} {ref.path}",
            file=sys.stderr,
        )

        nfe: list[float] = []
        num_finite = 0

        def sample_batches():
            nonlocal num_finite
            gen = torch.Generator(device=device).manual_seed(seed)
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(seed)
                for start in range(0, args.num_samples, batch_size):
                    n = min(batch_size, args.num_samples - start)
                    x, stats = model.sample(n, generator=gen)
                    if stats.get("nfe") is not None:
                        nfe.append(float(stats["nfe"]))
                    x = x.reshape(n, *data.image_shape)
                    num_finite += int(torch.isfinite(x).flatten(1).all(1).sum())
                    yield samples_to_images(x, data.num_levels)

        feats = compute_features(
            extractor,
            sample_batches(),
            progress=progress,
            total=args.num_samples,
            dtype=np.float32,  # halves the memory of 50k × 2048 features
        )
    except FeatureError as e:
        raise ConfigError(str(e)) from None
    fid = frechet_distance(*feature_statistics(feats), ref.mu, ref.sigma)
    kid_value, kid_stderr = kid(
        feats,
        ref.features,
        num_subsets=args.kid_subsets,
        subset_size=args.kid_subset_size,
        seed=seed,
    )
    out = {
        "fid": fid,
        "kid": kid_value,
        "kid_stderr": kid_stderr,
        "num_samples": args.num_samples,
        "features": extractor.name,
        "feature_identity": extractor.identity,
        "iteration": run.iteration,
        "seed": seed,
        "batch_size": batch_size,
        "kid_subsets": args.kid_subsets,
        "kid_subset_size": args.kid_subset_size,
        "sampling": sampling_settings(model),
        "nfe_per_sample": float(np.mean(nfe)) if nfe else None,
        "finite_fraction": num_finite / args.num_samples,
        "reference": {"num_images": ref.num_images, "cache": str(ref.path)},
        "dataset": data.name,
        "run_dir": str(run.run_dir),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
