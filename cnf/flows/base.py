"""The flow interface shared by every invertible map in the library.

Convention (one for the whole library, see DESIGN.md §1): a flow maps *data*
``x`` (t = 0) to the *base* variable ``z`` (t = T). ``forward`` is the
normalising direction and returns the log-determinant of its Jacobian, so that

    log p_X(x) = log p_Z(z) + logdet,   z, logdet = flow(x).

``inverse`` is the sampling direction. Flows are stackable with
:class:`SequentialFlow`, which adds the per-step log-determinants.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


class Flow(nn.Module):
    """An invertible map ``x -> z`` with a tractable log-determinant.

    Subclasses implement :meth:`forward` and :meth:`inverse`. Shapes: ``x`` is
    ``(B, *event_shape)``; ``logdet`` is ``(B,)`` and equals
    ``log|det dz/dx|`` per sample.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, z: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def regularization(self) -> dict[str, Tensor]:
        """Extra per-sample training terms produced by the last forward call.

        Continuous flows return their RNODE integrals here; discrete flows
        return an empty dict.
        """
        return {}


class SequentialFlow(Flow):
    """Composition ``f_K ∘ … ∘ f_1``; ``forward`` applies ``f_1`` first."""

    def __init__(self, flows: Iterable[Flow]):
        super().__init__()
        self.flows = nn.ModuleList(flows)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for flow in self.flows:
            x, ld = flow(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor) -> Tensor:
        for flow in reversed(self.flows):
            z = flow.inverse(z)
        return z

    def regularization(self) -> dict[str, Tensor]:
        total: dict[str, Tensor] = {}
        for flow in self.flows:
            for k, v in flow.regularization().items():
                total[k] = total[k] + v if k in total else v
        return total


class IdentityFlow(Flow):
    """``z = x`` with log-determinant 0 (INDM with this flow is a plain score model)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum a ``(B, ...)`` tensor over every dimension but the first."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def standard_normal_logprob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over all but the batch dimension, shape ``(B,)``."""
    d = z[0].numel()
    return -0.5 * sum_except_batch(z**2) - 0.5 * d * torch.log(
        torch.tensor(2 * torch.pi, dtype=z.dtype)
    )
