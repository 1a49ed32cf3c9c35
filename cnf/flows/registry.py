"""Name -> builder registry of the discrete flows.

Each name maps to a builder taking ``event_shape`` and keyword options; the
builder dispatches on the event shape (``(D,)`` vectors, ``(C, H, W)`` images):

========  ==================================  ================================
name      vectors ``(D,)``                    images ``(C, H, W)``
========  ==================================  ================================
nice      :func:`~.multiscale.nice_vector`    :func:`~.multiscale.nice_image`
realnvp   :func:`~.multiscale.realnvp_vector` :func:`~.multiscale.realnvp_image`
glow      :func:`~.multiscale.glow_vector`    :func:`~.multiscale.glow_image`
resflow   :func:`~.residual.resflow_vector`   :func:`~.residual.resflow_image`
========  ==================================  ================================

Example:
    >>> flow = build_flow("glow", event_shape=(3, 32, 32), num_scales=3, steps_per_scale=8)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from cnf.flows.base import Flow
from cnf.flows.multiscale import (
    glow_image,
    glow_vector,
    nice_image,
    nice_vector,
    realnvp_image,
    realnvp_vector,
)
from cnf.flows.residual import resflow_image, resflow_vector

__all__ = ["FLOWS", "FlowBuilder", "build_flow"]

Builder = Callable[..., Flow]


@dataclass(frozen=True)
class FlowBuilder:
    """Builds one flow family; dispatches on the event shape and checks options.

    Attributes:
        name: Registry name (used in error messages).
        vector: Builder ``(dim, **options)`` for ``(D,)`` events, or ``None``.
        image: Builder ``((C, H, W), **options)`` for image events, or ``None``.
    """

    name: str
    vector: Builder | None
    image: Builder | None

    def __call__(self, event_shape: tuple[int, ...], **kwargs) -> Flow:
        event_shape = tuple(int(s) for s in event_shape)
        if len(event_shape) == 1:
            builder, kind, first = self.vector, "vector", event_shape[0]
        elif len(event_shape) == 3:
            builder, kind, first = self.image, "image", event_shape
        else:
            raise ValueError(f"event_shape must be (D,) or (C, H, W), got {event_shape}")
        if builder is None:
            raise ValueError(
                f"flow {self.name!r} has no {kind} builder (event_shape {event_shape})"
            )
        # Skip the first parameter (dim / event_shape); the rest are the options.
        valid = list(inspect.signature(builder).parameters)[1:]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(repr(k) for k in unknown)} for flow "
                f"{self.name!r} ({kind}); valid: {', '.join(sorted(valid))}"
            )
        return builder(first, **kwargs)


FLOWS: dict[str, FlowBuilder] = {
    "glow": FlowBuilder("glow", glow_vector, glow_image),
    "nice": FlowBuilder("nice", nice_vector, nice_image),
    "realnvp": FlowBuilder("realnvp", realnvp_vector, realnvp_image),
    "resflow": FlowBuilder("resflow", resflow_vector, resflow_image),
}


def build_flow(name: str, *, event_shape: tuple[int, ...], **kwargs) -> Flow:
    """Build the discrete flow ``name`` for events of shape ``event_shape``.

    Args:
        name: One of ``glow``, ``nice``, ``realnvp``, ``resflow``.
        event_shape: ``(D,)`` for vectors or ``(C, H, W)`` for images.
        **kwargs: Options of the corresponding builder (see the module table).

    Returns:
        A :class:`~cnf.flows.base.Flow` mapping ``(B, *event_shape)`` to ``z`` of
        the same shape, with ``log p(x) = log N(z; 0, I) + logdet``.

    Raises:
        ValueError: for an unknown name, an unsupported event shape, or an
            option the builder does not take (the message lists the valid ones).
    """
    if name not in FLOWS:
        raise ValueError(f"unknown flow {name!r}; valid: {', '.join(sorted(FLOWS))}")
    return FLOWS[name](event_shape, **kwargs)
