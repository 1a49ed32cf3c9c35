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
and defaults (``activation`` by name, from :data:`cnf.nets.ACTIVATIONS`).
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
    >>> flow = zuko_maf(3, transforms=2, hidden_features=[16])  # doctest: +SKIP
    >>> z, logdet = flow(torch.randn(5, 3))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from cnf.flows.base import Flow
from cnf.nets import ACTIVATIONS

__all__ = ["ZUKO_EXTRA", "ZukoFlow", "zuko_made", "zuko_maf", "zuko_nsf"]

ZUKO_EXTRA = "pip install -e '.[zuko]' (or pip install zuko)"


def _zuko(name: str) -> ModuleType:
    try:
        return importlib.import_module("zuko.flows")
    except ImportError:
        # A config error: the CLI prints it as one line and exits with 2.
        from cnf.config import ConfigError

        raise ConfigError(
            f"model.flow.name={name} needs zuko, an optional extra: {ZUKO_EXTRA}"
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


def zuko_made(
    dim: int,
    *,
    hidden_features: Sequence[int] = (64, 64),
    activation: str = "relu",
    residual: bool = False,
    passes: int | None = None,
) -> ZukoFlow:
    """MADE with Gaussian conditionals: ``zuko.flows.MAF(dim, transforms=1)``.

    Args:
        dim: Number of features ``D``.
        hidden_features: Widths of the masked MLP's hidden layers.
        activation: A :data:`cnf.nets.ACTIVATIONS` name.
        residual: Residual masked MLP blocks.
        passes: Sequential passes of the inverse (None: ``D``, fully autoregressive).
    """
    zf = _zuko("zuko.made")
    return _wrap(
        zf.MAF(dim, transforms=1, passes=passes, **_mlp(hidden_features, activation, residual))
    )


def zuko_maf(
    dim: int,
    *,
    transforms: int = 3,
    randperm: bool = False,
    hidden_features: Sequence[int] = (64, 64),
    activation: str = "relu",
    residual: bool = False,
    passes: int | None = None,
) -> ZukoFlow:
    """Masked autoregressive flow: ``zuko.flows.MAF``.

    Args:
        dim: Number of features ``D``.
        transforms: Masked autoregressive layers.
        randperm: Permute the variables at random between layers (else reverse them).
        hidden_features, activation, residual, passes: As :func:`zuko_made`.
    """
    zf = _zuko("zuko.maf")
    mlp = _mlp(hidden_features, activation, residual)
    return _wrap(zf.MAF(dim, transforms=transforms, randperm=randperm, passes=passes, **mlp))


def zuko_nsf(
    dim: int,
    *,
    transforms: int = 3,
    randperm: bool = False,
    bins: int = 8,
    slope: float = 1e-3,
    hidden_features: Sequence[int] = (64, 64),
    activation: str = "relu",
    residual: bool = False,
    passes: int | None = None,
) -> ZukoFlow:
    """Neural spline flow: ``zuko.flows.NSF`` (rational-quadratic splines on [-5, 5]).

    Args:
        dim: Number of features ``D``.
        transforms, randperm: As :func:`zuko_maf`.
        bins: Spline bins ``K``.
        slope: Minimum slope of the splines.
        hidden_features, activation, residual, passes: As :func:`zuko_made`
            (``passes=2``: coupling layers).
    """
    zf = _zuko("zuko.nsf")
    mlp = _mlp(hidden_features, activation, residual)
    flow = zf.NSF(
        dim,
        transforms=transforms,
        randperm=randperm,
        bins=bins,
        slope=slope,
        passes=passes,
        **mlp,
    )
    return _wrap(flow)
