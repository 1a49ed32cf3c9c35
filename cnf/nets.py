"""Time-conditioned networks for vector fields, scores and drifts.

Layer types follow FFJORD's ``diffeq_layers`` (Grathwohl et al. 2019):

* ``ignore``       ``h' = W h + b``                          (time-independent)
* ``concat``       ``h' = W [h, t] + b``
* ``squash``       ``h' = (W h + b) ⊙ σ(W_g t + b_g)``
* ``concatsquash`` ``h' = (W h + b) ⊙ σ(W_g t + b_g) + W_b t``
* ``blend``        ``h' = (1 − t)(W₀ h + b₀) + t (W₁ h + b₁)``

Time ``t`` may be a scalar (one time for the whole batch, as inside an ODE
solve) or a ``(B,)`` tensor (one time per sample, as in score matching and
flow matching). Smooth activations (tanh, softplus, swish) keep adaptive
solvers cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _time_column(t: Tensor | float, x: Tensor) -> Tensor:
    """Return ``t`` as a ``(1, 1)`` or ``(B, 1)`` tensor matching ``x``'s dtype/device."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, 1)


class TimeLayer(nn.Module):
    """Base class: ``forward(t, x)`` with ``x`` of shape ``(B, in_dim)``.

    ``forward_tangent(tt, x, dx)`` (``tt``: time as a ``(1, 1)`` or ``(B, 1)``
    column) returns the output and the layer's Jacobian applied to tangents
    ``dx`` of shape ``(K, B or 1, in_dim)`` (the layer is affine in ``x``);
    :meth:`TimeMLP.forward_with_jacobian` uses it for forward-mode Jacobians.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim

    @property
    def output_linear(self) -> nn.Linear:  # the map that zero-init acts on
        return self.linear


class IgnoreLinear(TimeLayer):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.linear(x)

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        return self.linear(x), F.linear(dx, self.linear.weight)


class ConcatLinear(TimeLayer):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim)
        self.linear = nn.Linear(in_dim + 1, out_dim)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = _time_column(t, x).expand(x.shape[0], 1)
        return self.linear(torch.cat([tt, x], dim=1))

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward(tt, x), F.linear(dx, self.linear.weight[:, 1:])


class SquashLinear(TimeLayer):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim)
        self.linear = nn.Linear(in_dim, out_dim)
        self.gate = nn.Linear(1, out_dim)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.linear(x) * torch.sigmoid(self.gate(_time_column(t, x)))

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        gate = torch.sigmoid(self.gate(tt))
        return self.linear(x) * gate, F.linear(dx, self.linear.weight) * gate


class ConcatSquashLinear(TimeLayer):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim)
        self.linear = nn.Linear(in_dim, out_dim)
        self.gate = nn.Linear(1, out_dim)
        self.shift = nn.Linear(1, out_dim, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = _time_column(t, x)
        return self.linear(x) * torch.sigmoid(self.gate(tt)) + self.shift(tt)

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        gate = torch.sigmoid(self.gate(tt))
        return self.linear(x) * gate + self.shift(tt), F.linear(dx, self.linear.weight) * gate

    def zero_(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        nn.init.zeros_(self.shift.weight)


class BlendLinear(TimeLayer):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim)
        self.linear = nn.Linear(in_dim, out_dim)
        self.linear1 = nn.Linear(in_dim, out_dim)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = _time_column(t, x)
        y0, y1 = self.linear(x), self.linear1(x)
        return y0 + (y1 - y0) * tt

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        d0, d1 = F.linear(dx, self.linear.weight), F.linear(dx, self.linear1.weight)
        return self.forward(tt, x), d0 + (d1 - d0) * tt

    def zero_(self) -> None:
        for lin in (self.linear, self.linear1):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)


LAYERS: dict[str, type[TimeLayer]] = {
    "ignore": IgnoreLinear,
    "concat": ConcatLinear,
    "squash": SquashLinear,
    "concatsquash": ConcatSquashLinear,
    "blend": BlendLinear,
}

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "swish": nn.SiLU,
    "elu": nn.ELU,
    "relu": nn.ReLU,
    "selu": nn.SELU,
}


def _activation_tangent(act: nn.Module, a: Tensor, y: Tensor, da: Tensor) -> Tensor:
    """Apply the derivative of the elementwise activation ``y = act(a)`` to tangents ``da``."""
    if isinstance(act, nn.Tanh):
        # One fused op, twice differentiable: da * (1 - y²).
        return torch.ops.aten.tanh_backward(da, y)
    if isinstance(act, nn.Softplus):
        d = torch.sigmoid(a * act.beta)
    elif isinstance(act, nn.SiLU):
        s = torch.sigmoid(a)
        d = s * (1 + a * (1 - s))
    elif isinstance(act, nn.ELU):
        d = torch.where(a > 0, torch.ones_like(a), y + act.alpha)
    elif isinstance(act, nn.ReLU):
        d = (a > 0).to(a.dtype)
    elif isinstance(act, nn.SELU):
        scale, alpha = 1.0507009873554805, 1.6732632423543772
        d = torch.where(a > 0, torch.full_like(a, scale), y + scale * alpha)
    else:  # pragma: no cover - every registered activation is handled above
        raise TypeError(f"no tangent rule for {type(act).__name__}")
    return d * da


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} '{name}'; valid: {', '.join(sorted(table))}")
    return table[name]


class TimeMLP(nn.Module):
    """A time-conditioned MLP ``(t, x) -> y`` built from one layer type.

    Args:
        in_dim: Input dimension ``D``.
        hidden_dims: Widths of the hidden layers, e.g. ``(64, 64, 64)``.
        out_dim: Output dimension (default ``in_dim``).
        layer: One of :data:`LAYERS`.
        activation: One of :data:`ACTIVATIONS`.
        zero_init: Zero the last layer so the field starts at 0 (identity flow).

    Shapes: ``t`` scalar or ``(B,)``; ``x`` ``(B, D)``; output ``(B, out_dim)``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int] = (64, 64, 64),
        out_dim: int | None = None,
        *,
        layer: str = "concatsquash",
        activation: str = "tanh",
        zero_init: bool = False,
    ):
        super().__init__()
        layer_cls = _lookup(LAYERS, layer, "layer type")
        act_cls = _lookup(ACTIVATIONS, activation, "activation")
        dims = [in_dim, *hidden_dims, out_dim or in_dim]
        self.layers = nn.ModuleList(layer_cls(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(act_cls() for _ in dims[1:-1])
        if zero_init:
            last = self.layers[-1]
            if hasattr(last, "zero_"):
                last.zero_()
            else:
                nn.init.zeros_(last.linear.weight)
                nn.init.zeros_(last.linear.bias)

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(t, h)
            if i < len(self.acts):
                h = self.acts[i](h)
        return h

    def forward_with_trace(
        self, t: Tensor | float, x: Tensor, *, frobenius: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Output, exact Jacobian trace ``(B,)`` and optionally ``‖∂f/∂x‖_F²`` ``(B,)``."""
        f, jac = self.forward_with_jacobian(t, x)
        div = torch.einsum("bii->b", jac.transpose(0, 1))
        return f, div, (jac.pow(2).sum(dim=(0, 2)) if frobenius else None)

    def forward_with_jacobian(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """Output and full Jacobian by forward-mode propagation through the layers.

        All layers are affine in ``h`` followed by elementwise activations, so
        ``J`` is carried alongside ``h`` as ``D`` tangent columns. In low
        dimension this is much cheaper than reverse-mode Jacobians: no
        ``autograd.grad`` call, and training back-propagates through one
        ordinary graph instead of a double-backward one.

        Returns:
            ``y`` of shape ``(B, out)`` and ``J`` of shape ``(D, B, out)`` with
            ``J[i, b, j] = ∂y_j/∂x_i`` at sample ``b``.
        """
        d = x.shape[1]
        h = x
        tt = _time_column(t, x)
        # Tangents of the input: the identity, one column per input coordinate.
        # Shape (D, 1, D): until the first activation the tangents are the same
        # for every sample, so they broadcast over the batch for free.
        dh = torch.eye(d, dtype=x.dtype, device=x.device).unsqueeze(1)
        for i, layer in enumerate(self.layers):
            h_new, dh = layer.forward_tangent(tt, h, dh)
            if i < len(self.acts):
                a = h_new
                h_new = self.acts[i](a)
                dh = _activation_tangent(self.acts[i], a, h_new, dh)
            h = h_new
        return h, dh.expand(d, x.shape[0], dh.shape[-1])
