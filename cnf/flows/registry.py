"""Name -> builder registry of the discrete flows.

Each name maps to a builder taking ``event_shape`` and keyword options; the
builder dispatches on the event shape (``(D,)`` vectors, ``(C, H, W)`` images):

========  ==================================  ================================
name      vectors ``(D,)``                    images ``(C, H, W)``
========  ==================================  ================================
nice      :func:`~.multiscale.nice_vector`    :func:`~.multiscale.nice_image`
realnvp   :func:`~.multiscale.realnvp_vector` :func:`~.multiscale.realnvp_image`
glow      :func:`~.multiscale.glow_vector`    :func:`~.multiscale.glow_image`
resflow   :func:`~.residual.resflow`          :func:`~.residual.resflow`
resflow_  :func:`~.global_latent.             :func:`~.global_latent.
global    global_latent_resflow`              global_latent_resflow`
========  ==================================  ================================

and, through the optional extra zuko (:mod:`~.zuko_flows`), for vectors only:
``zuko.made``, ``zuko.maf``, ``zuko.nsf``.

``resflow_global`` is INDM's released flow: a residual flow conditioned on a
global latent with an encoder and a prior, whose flow term is a variational
bound (:mod:`cnf.flows.global_latent`), not an exact log-determinant.

Example:
    >>> flow = build_flow("glow", event_shape=(3, 32, 32), num_scales=3, steps_per_scale=8)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cnf.flows.base import Flow, IdentityFlow
from cnf.flows.global_latent import global_latent_resflow
from cnf.flows.multiscale import (
    glow_image,
    glow_vector,
    nice_image,
    nice_vector,
    realnvp_image,
    realnvp_vector,
)
from cnf.flows.residual import resflow
from cnf.flows.zuko_flows import zuko_made, zuko_maf, zuko_nsf
from cnf.registry import Registry

__all__ = ["FLOWS", "FLOWS_OR_IDENTITY", "FlowBuilder", "build_flow"]

Builder = Callable[..., Flow]


@dataclass(frozen=True)
class FlowBuilder:
    """Builds one flow family; dispatches on the event shape.

    Attributes:
        name: Registry name (used in error messages).
        vector: Builder ``(dim, **options)`` for ``(D,)`` events, or ``None``.
        image: Builder ``((C, H, W), **options)`` for image events, or ``None``.

    The keyword options of each builder are the flow's config options
    (:func:`cnf.schema.options_schema` derives its schema from them).
    """

    name: str
    vector: Builder | None
    image: Builder | None

    def builder(self, kind: str) -> Builder:
        """The builder for ``kind`` (``vector`` | ``image``)."""
        builder = self.vector if kind == "vector" else self.image
        if builder is None:
            raise ValueError(f"flow '{self.name}' has no {kind} builder")
        return builder

    def __call__(self, event_shape: tuple[int, ...], **options: Any) -> Flow:
        event_shape = tuple(int(s) for s in event_shape)
        if len(event_shape) not in (1, 3):
            raise ValueError(f"event_shape must be (D,) or (C, H, W), got {event_shape}")
        kind = "vector" if len(event_shape) == 1 else "image"
        builder = self.builder(kind)
        valid = [
            p.name
            for p in inspect.signature(builder).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        ]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(repr(k) for k in unknown)} for flow "
                f"{self.name!r} ({kind}); valid: {', '.join(sorted(valid))}"
            )
        return builder(event_shape[0] if kind == "vector" else event_shape, **options)


@functools.wraps(resflow)
def _resflow_vector(dim: int, **options: Any) -> Flow:
    return resflow((dim,), **options)


@functools.wraps(global_latent_resflow)
def _global_latent_vector(dim: int, **options: Any) -> Flow:
    return global_latent_resflow((dim,), **options)


FLOWS: Registry[FlowBuilder] = Registry(
    "flow",
    {
        "glow": FlowBuilder("glow", glow_vector, glow_image),
        "nice": FlowBuilder("nice", nice_vector, nice_image),
        "realnvp": FlowBuilder("realnvp", realnvp_vector, realnvp_image),
        "resflow": FlowBuilder("resflow", _resflow_vector, resflow),
        "resflow_global": FlowBuilder(
            "resflow_global", _global_latent_vector, global_latent_resflow
        ),
        "zuko.made": FlowBuilder("zuko.made", zuko_made, None),
        "zuko.maf": FlowBuilder("zuko.maf", zuko_maf, None),
        "zuko.nsf": FlowBuilder("zuko.nsf", zuko_nsf, None),
    },
)


def _identity(shape: Any) -> Flow:
    return IdentityFlow()


# INDM may use no flow at all: with the identity it is exactly the score model.
FLOWS_OR_IDENTITY: Registry[FlowBuilder] = Registry(
    "flow", {**FLOWS, "identity": FlowBuilder("identity", _identity, _identity)}
)


def build_flow(name: str, *, event_shape: tuple[int, ...], **options: Any) -> Flow:
    """Build the discrete flow ``name`` for events of shape ``event_shape``.

    Args:
        name: One of ``glow``, ``nice``, ``realnvp``, ``resflow``, ``resflow_global``.
        event_shape: ``(D,)`` for vectors or ``(C, H, W)`` for images.
        **options: Options of the corresponding builder (see the module table).

    Returns:
        A :class:`~cnf.flows.base.Flow` mapping ``(B, *event_shape)`` to ``z`` of
        the same shape, with ``log p(x) = log N(z; 0, I) + logdet``.

    Raises:
        ValueError: for an unknown name, an unsupported event shape, or an
            option the builder does not take.
    """
    try:
        return FLOWS[name](event_shape, **options)
    except TypeError as e:
        raise ValueError(f"flow '{name}': {e}") from None
