"""Autoregressive flows from zuko (MADE, MAF, neural spline flow) behind the :class:`Flow` interface.

Registered in :data:`cnf.flows.registry.FLOWS` as ``zuko.made``, ``zuko.maf``
and ``zuko.nsf`` (vectors only), so they train through the ``flow`` family,
its loop, run folders and tables like the project's own flows:

========== ==================================================================
name       zuko model
========== ==================================================================
zuko.made  ``zuko.flows.MAF(D, transforms=1)``: one masked autoregressive
           Gaussian layer, i.e. MADE with Gaussian conditionals
zuko.maf   ``zuko.flows.MAF(D, transforms=...)``: a stack of them, the
           variable order reversed between layers (or permuted at random)
zuko.nsf   ``zuko.flows.NSF(D, ...)``: monotonic rational-quadratic splines
           on [-5, 5] (identity outside), autoregressive by default
========== ==================================================================

The options are the zuko constructors' keyword arguments, with their names
and defaults (``activation`` by name, from :data:`cnf.nets.ACTIVATIONS`;
``univariate: affine | spline`` chooses between MAF and NSF, which in zuko
differ only in it).
zuko's transform maps data to its base variable exactly as a :class:`Flow`
does (``forward`` = normalising direction with ``log|det ∂z/∂x|``); its base
distribution, a standard normal, is the :class:`~cnf.models.flow.FlowModel`'s
own, so only the transform is kept. Inverting an autoregressive transform
takes ``passes`` sequential passes (``D`` for a fully autoregressive one).

zuko is an optional extra (``pip install -e '.[zuko]'``), imported when a
flow is built.

References:
    Germain et al., "MADE: Masked Autoencoder for Distribution Estimation", ICML 2015.
    Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density
    Estimation", NeurIPS 2017.
    Durkan et al., "Neural Spline Flows", NeurIPS 2019.
    Rozet et al., zuko (https://github.com/probabilists/zuko).

Example:
    >>> flow = zuko_maf(3, transforms=2, hidden_features=[16], univariate="spline")  # doctest: +SKIP
    >>> z, logdet = flow(torch.randn(5, 3))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from cnf.flows.base import Flow
from cnf.nets import ACTIVATIONS

__all__ = ["ZUKO_EXTRA", "ZukoFlow", "zuko_made", "zuko_maf", "zuko_nsf"]

ZUKO_EXTRA = "pip install -e '.[zuko]' (or pip install zuko)"


def _zuko() -> ModuleType:
    try:
        return importlib.import_module("zuko.flows")
    except ImportError:
        # A config error: the CLI prints it as one line and exits with 2.
        from cnf.config import ConfigError

        raise ConfigError(
            f"model.flow.name: zuko.made, zuko.maf and zuko.nsf need zuko, an optional extra: "
            f"{ZUKO_EXTRA}"
        ) from None


class ZukoFlow(Flow):
    """A zuko flow's (unconditional) transform as a :class:`Flow`.

    Args:
        transform: A zuko lazy transform (``zuko.flows.Flow.transform``); called
            without context it gives a ``torch.distributions.Transform``.

    Shapes: ``x``, ``z`` ``(B, D)``; ``logdet`` ``(B,)``.
    """

    def __init__(self, transform: nn.Module):
        super().__init__()
        self.zuko_transform = transform

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.zuko_transform().call_and_ladj(x)

    def inverse(self, z: Tensor) -> Tensor:
        return self.zuko_transform().inv(z)


def _wrap(flow: Any) -> ZukoFlow:
    base = flow.base()
    # The FlowModel scores z under N(0, I): zuko's base must be exactly that.
    if not (bool((base.mean == 0).all()) and bool((base.stddev == 1).all())):
        raise ValueError("zuko flow: expected a standard-normal base")
    return ZukoFlow(flow.transform)


def _mlp(hidden_features: Sequence[int], activation: str, residual: bool) -> dict[str, Any]:
    if activation not in ACTIVATIONS:
        from cnf.config import ConfigError

        valid = ", ".join(sorted(ACTIVATIONS))
        raise ConfigError(f"model.flow.activation: unknown value '{activation}'; valid: {valid}")
    return {
        "hidden_features": tuple(int(h) for h in hidden_features),
        "activation": ACTIVATIONS[activation],
        "residual": residual,
    }


UNIVARIATE = ("affine", "spline")


def zuko_maf(
    dim: int,
    *,
    transforms: int = 3,
    randperm: bool = False,
    hidden_features: Sequence[int] = (64, 64),
    activation: str = "relu",
    residual: bool = False,
    passes: int | None = None,
    univariate: str = "affine",
    bins: int = 8,
    slope: float = 1e-3,
) -> ZukoFlow:
    """A masked autoregressive flow: ``zuko.flows.MAF``, or ``zuko.flows.NSF`` for splines.

    zuko's NSF is its MAF with rational-quadratic spline transforms instead of
    affine ones, so one builder serves both (and MADE, one affine layer); the
    registry's ``zuko.made`` and ``zuko.nsf`` are this builder with other defaults.

    Args:
        dim: Number of features ``D``.
        transforms: Masked autoregressive layers.
        randperm: Permute the variables at random between layers (else reverse them).
        hidden_features: Widths of each masked MLP's hidden layers.
        activation: A :data:`cnf.nets.ACTIVATIONS` name.
        residual: Residual masked MLP blocks.
        passes: Sequential passes of the inverse (None: ``D``, fully
            autoregressive; 2: coupling layers).
        univariate: ``affine`` (MAF) or ``spline`` (NSF: monotonic
            rational-quadratic splines on [-5, 5], the identity outside).
        bins, slope: The splines' number of bins ``K`` and minimum slope
            (``univariate=spline`` only).
    """
    from cnf.config import ConfigError

    if univariate not in UNIVARIATE:
        raise ConfigError(
            f"model.flow.univariate: unknown value '{univariate}'; valid: {', '.join(UNIVARIATE)}"
        )
    if univariate == "affine" and (bins, slope) != (8, 1e-3):
        raise ConfigError("model.flow.bins, slope: only for univariate=spline (zuko.nsf)")
    zf = _zuko()
    options = dict(transforms=transforms, randperm=randperm, passes=passes)
    options.update(_mlp(hidden_features, activation, residual))
    if univariate == "spline":
        return _wrap(zf.NSF(dim, bins=bins, slope=slope, **options))
    return _wrap(zf.MAF(dim, **options))


def _preset(name: str, **defaults: Any) -> Callable[..., ZukoFlow]:
    """:func:`zuko_maf` registered as ``name``, with other defaults (shown in resolved configs)."""

    @functools.wraps(zuko_maf)
    def build(dim: int, **options: Any) -> ZukoFlow:
        return zuko_maf(dim, **{**defaults, **options})

    build.option_defaults = defaults  # type: ignore[attr-defined]
    build.__name__ = name
    return build


# MADE with Gaussian conditionals: one masked autoregressive affine layer.
zuko_made = _preset("zuko_made", transforms=1)
# Neural spline flow: zuko's NSF defaults (8 bins, autoregressive).
zuko_nsf = _preset("zuko_nsf", univariate="spline")
