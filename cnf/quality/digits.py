"""An offline feature network for 8×8 digits: a small CNN classifier trained by the project.

FID needs a feature network; Inception-v3 weights cannot ship with the code
and mean nothing on 8×8 images. For scikit-learn's digits the project trains
its own: :class:`DigitsCNN` on the **training split of**
:func:`cnf.data.images.load_digits_images` (1258 images; its 359 test images
stay held out and give the reported accuracy), seeded and deterministic (CPU,
one thread, a fixed recipe, ~10–25 s). Its penultimate layer (128 ReLU units)
gives the features of a "digits FD" and "digits KID" (:class:`DigitsFeatures`),
as Inception's pool layer does for FID; they are divided by their RMS over the
training images (a constant fixed at training time) so that ``xᵀy/F`` is O(1)
in KID's kernel.

**Input convention.** The network sees ``level/16`` for the 17 grey levels,
computed as ``clamp(⌊x · 17⌋, 0, 16)/16`` from its input ``x`` — so images as
``level/16`` and model samples on the dequantised scale ``(level + u)/17``
give the same features (:mod:`cnf.quality.images`).

**Cache.** Weights are trained on first use and saved under
``<cache_dir>/digits/classifier-<digest>.pt`` (default cache: ``$CNF_CACHE``
or ``~/.cache/cnf``), where the digest covers the recipe and the bytes of the
training images and labels; a later call loads them (``weights_only=True``).
``python experiments/digits_features.py [--force]`` (re)builds them and prints
the test accuracy.

Example:
    >>> features = DigitsFeatures()                       # trains once, then cached
    >>> features(torch.rand(5, 1, 8, 8)).shape
    (5, 128)

References:
    Alpaydin & Kaynak, "Optical recognition of handwritten digits", UCI, 1998
    (scikit-learn's ``load_digits``).
    LeCun et al., "Gradient-based learning applied to document recognition", Proc. IEEE 1998.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnf.quality.features import FeatureError, FeatureExtractor, default_cache_dir
from cnf.quality.images import to_levels

__all__ = [
    "DigitsCNN",
    "DigitsFeatures",
    "DigitsRecipe",
    "digits_labeled_split",
    "load_digits_classifier",
    "train_digits_classifier",
]

NUM_LEVELS = 17
IMAGE_SHAPE = (1, 8, 8)


@dataclass(frozen=True)
class DigitsRecipe:
    """Everything that determines the trained weights (with the training data)."""

    channels: tuple[int, int, int] = (16, 32, 32)
    hidden: int = 128
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3  # Adam, cosine decay to 0 over all steps
    max_shift: int = 1  # augmentation: random shifts of up to this many pixels
    seed: int = 0
    version: int = 2  # bump when the code changes what these numbers mean


class DigitsCNN(nn.Module):
    """Three 3×3 conv layers (two 2×2 max-pools), a hidden layer of features, 10 logits.

    Input ``(N, 1, 8, 8)`` in ``[0, 1]`` (``level/16``).
    """

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 32), hidden: int = 128):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.hidden = nn.Linear(c3 * 2 * 2, hidden)
        self.logits = nn.Linear(hidden, 10)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``(N, hidden)``."""
        h = F.relu(self.conv1(2 * x - 1))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.features(x))


def digits_labeled_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (levels (N, 1, 8, 8) uint8, labels (N,) int64)}`` — exactly the split of
    :func:`cnf.data.images.load_digits_images` (checked), with the class labels."""
    from sklearn.datasets import load_digits

    from cnf.data.files import split_array
    from cnf.data.images import load_digits_images

    raw = load_digits()
    levels = raw.images.astype(np.uint8)[:, None]
    arrays = load_digits_images()
    # Same fractions and seed as load_digits_images: a split of the indices.
    idx = split_array(np.arange(len(levels)), val_fraction=0.1, test_fraction=0.2, seed=17)
    out = {}
    for name, ix, ref in zip(
        ("train", "val", "test"), idx, (arrays.train, arrays.val, arrays.test)
    ):
        if not np.array_equal(levels[ix], ref):
            raise RuntimeError(f"digits {name} split differs from load_digits_images()")
        out[name] = (levels[ix], raw.target[ix].astype(np.int64))
    return out


def _digest(recipe: DigitsRecipe, train: tuple[np.ndarray, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    for a in train:
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@contextmanager
def _one_thread() -> Iterator[None]:
    # Bit-identical weights: one thread fixes the order of every float reduction.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction (zero fill)."""
    if max_shift == 0:
        return x
    n, s = x.shape[0], max_shift
    padded = F.pad(x, (s, s, s, s))
    dy = torch.randint(0, 2 * s + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * s + 1, (n,), generator=generator)
    r = torch.arange(x.shape[-1])
    rows = (dy[:, None] + r)[:, :, None]
    cols = (dx[:, None] + r)[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


def _accuracy(net: DigitsCNN, levels: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        x = torch.as_tensor(levels, dtype=torch.float32) / (NUM_LEVELS - 1)
        return float((net(x).argmax(1).numpy() == labels).mean())


def train_digits_classifier(
    recipe: DigitsRecipe = DigitsRecipe(), *, log: Callable[[str], None] | None = None
) -> tuple[DigitsCNN, dict[str, Any]]:
    """Train :class:`DigitsCNN` on the digits training split (CPU, one thread, deterministic).

    Returns:
        The network (eval mode) and ``{"train_accuracy", "val_accuracy",
        "test_accuracy", "train_seconds", "feature_scale", "recipe", "digest"}``.
    """
    split = digits_labeled_split()
    levels, labels = split["train"]
    x = torch.as_tensor(levels, dtype=torch.float32) / (NUM_LEVELS - 1)
    y = torch.as_tensor(labels)
    n, bs = len(x), recipe.batch_size
    steps = recipe.epochs * -(-n // bs)
    t0 = time.perf_counter()
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        net = DigitsCNN(recipe.channels, recipe.hidden)
        gen = torch.Generator().manual_seed(recipe.seed)
        opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for epoch in range(recipe.epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, bs):
                b = perm[i : i + bs]
                loss = F.cross_entropy(net(_shift(x[b], recipe.max_shift, gen)), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
            if log is not None and (epoch + 1) % 10 == 0:
                log(f"digits classifier: epoch {epoch + 1}/{recipe.epochs}, loss {loss.item():.4f}")
        net.eval()
        info = {f"{s}_accuracy": _accuracy(net, *split[s]) for s in ("train", "val", "test")}
        with torch.no_grad():
            mean_square = float(net.features(x).pow(2).mean())
    # Features are reported divided by their RMS on the training images, so
    # xᵀy/F is O(1) and KID's cubic kernel stays well scaled (as for Inception).
    info["feature_scale"] = 1.0 / max(mean_square, 1e-12) ** 0.5
    info["train_seconds"] = time.perf_counter() - t0
    info["recipe"] = asdict(recipe)
    info["digest"] = _digest(recipe, split["train"])
    return net, info


def load_digits_classifier(
    *,
    cache_dir: str | Path | None = None,
    recipe: DigitsRecipe = DigitsRecipe(),
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[DigitsCNN, dict[str, Any]]:
    """The cached classifier for ``recipe``, trained (and cached) first if missing or ``force``.

    Returns:
        The network (eval mode, CPU) and its info (see
        :func:`train_digits_classifier`) plus ``"path"`` and ``"trained"``
        (True when this call trained it).
    """
    digest = _digest(recipe, digits_labeled_split()["train"])
    path = Path(cache_dir or default_cache_dir()) / "digits" / f"classifier-{digest[:16]}.pt"
    if path.is_file() and not force:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state["info"]["digest"] == digest and "feature_scale" in state["info"]:
                net = DigitsCNN(recipe.channels, recipe.hidden)
                net.load_state_dict(state["weights"])
                return net.eval(), {**state["info"], "path": str(path), "trained": False}
        except Exception as e:  # an unreadable cache file is rebuilt
            if log is not None:
                log(f"digits classifier: rebuilding unreadable cache {path} ({type(e).__name__})")
    if log is not None:
        log(f"digits classifier: training (cache {path})")
    net, info = train_digits_classifier(recipe, log=log)
    # Imported here: cnf.train's package imports the data sets (scikit-learn).
    from cnf.train.checkpoint import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"weights": net.state_dict(), "info": info}
    atomic_write_bytes(path, lambda fh: torch.save(state, fh))
    return net, {**info, "path": str(path), "trained": True}


class DigitsFeatures(FeatureExtractor):
    """Penultimate features (128) of the project's digits classifier, for 1×8×8 images in ``[0, 1]``.

    Args:
        cache_dir: Where the weights are cached (default: ``$CNF_CACHE`` or ``~/.cache/cnf``).
        device: Where the network runs.
        recipe: Training recipe (the default is the one the reported accuracy belongs to).
        progress: Report training on stderr if the weights are not cached yet.
    """

    name = "digits"
    num_levels = NUM_LEVELS

    def __init__(
        self,
        *,
        cache_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        recipe: DigitsRecipe = DigitsRecipe(),
        progress: bool = False,
    ):
        super().__init__(device=device)
        log = None
        if progress:
            import sys

            log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
        self.net, self.info = load_digits_classifier(cache_dir=cache_dir, recipe=recipe, log=log)
        self.net = self.net.to(self.device)
        self.num_features = recipe.hidden

    @property
    def identity(self) -> str:
        return f"digits:{self.info['digest']}"

    def _move(self, device: torch.device) -> None:
        self.net = self.net.to(device)

    def _forward(self, images: Tensor) -> Tensor:
        if tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise FeatureError(
                f"digits features need 1×8×8 images, got {tuple(images.shape[1:])} "
                "(use a TorchScript feature network for other data)"
            )
        x = to_levels(images, NUM_LEVELS).float() / (NUM_LEVELS - 1)
        return self.net.features(x) * self.info["feature_scale"]
