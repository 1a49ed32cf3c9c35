"""Plots for run folders (matplotlib is imported only when a plot is made)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cnf.models.base import GenerativeModel


@torch.no_grad()
def density_on_grid(
    model: GenerativeModel,
    *,
    lim: float = 4.0,
    n: int = 120,
    batch_size: int = 5000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Model density of a 2-D model on an ``n × n`` grid over ``[-lim, lim]²``.

    Returns ``(xs, density (n, n), mass)`` where ``mass = Σ p · cell area`` is
    the probability the model puts on the square (≈ 1 for a trained model
    whose data lie inside it).
    """
    xs = np.linspace(-lim, lim, n)
    gx, gy = np.meshgrid(xs, xs)
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    logp = []
    for i in range(0, len(pts), batch_size):
        xb = torch.as_tensor(pts[i : i + batch_size], dtype=model.dtype, device=model.device)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            out = model.evaluate(xb)
        lp = -(out.nll if out.nll is not None else out.nelbo)
        logp.append(lp.double().cpu().numpy())
    dens = np.exp(np.concatenate(logp)).reshape(n, n)
    cell = (xs[1] - xs[0]) ** 2
    return xs, dens, float(dens.sum() * cell)


def save_density_plot(
    xs: np.ndarray, dens: np.ndarray, path: str | Path, *, title: str = ""
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
    ax.pcolormesh(xs, xs, dens, cmap="inferno", shading="auto")
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_samples_plot(
    samples: np.ndarray,
    path: str | Path,
    *,
    lim: float = 4.0,
    title: str = "",
    data: np.ndarray | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if data is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(4 * ncols, 4), dpi=120, squeeze=False)
    panels = [(samples, "model samples")] + ([(data, "data (test)")] if data is not None else [])
    for ax, (pts, label) in zip(axes[0], panels):
        ax.hist2d(pts[:, 0], pts[:, 1], bins=120, range=[[-lim, lim], [-lim, lim]], cmap="inferno")
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{label} {title}".strip(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_image_grid(
    images: np.ndarray, path: str | Path, *, image_shape: tuple[int, int, int], ncols: int = 10
) -> None:
    """Save up to ``ncols²`` images ``(N, *)`` with values in ``[0, 1]`` as one PNG grid.

    ``image_shape`` is ``(C, H, W)`` (C = 1 grey, 3 RGB); values are clipped to
    ``[0, 1]`` (model samples can leave the data range slightly).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, h, w = image_shape
    imgs = np.clip(np.asarray(images, dtype=np.float64)[: ncols * ncols], 0, 1)
    imgs = imgs.reshape(-1, c, h, w).transpose(0, 2, 3, 1)
    rows = max(1, -(-len(imgs) // ncols))
    grid = np.ones((rows * (h + 1) + 1, ncols * (w + 1) + 1, c))
    for k, img in enumerate(imgs):
        r, q = divmod(k, ncols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = img
    fig, ax = plt.subplots(figsize=(ncols * 0.6, rows * 0.6), dpi=120)
    ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
    ax.set_axis_off()
    fig.tight_layout(pad=0.1)
    fig.savefig(path)
    plt.close(fig)
