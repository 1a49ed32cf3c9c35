"""Time-conditioned networks for vector fields, scores and drifts.

Layer types follow FFJORD's ``diffeq_layers`` (Grathwohl et al. 2019):

* ``ignore``       ``h' = W h + b``                          (time-independent)
* ``concat``       ``h' = W [h, t] + b``
* ``squash``       ``h' = (W h + b) ⊙ σ(W_g t + b_g)``
* ``concatsquash`` ``h' = (W h + b) ⊙ σ(W_g t + b_g) + W_b t``
* ``blend``        ``h' = (1 − t)(W₀ h + b₀) + t (W₁ h + b₁)``
* ``add``          ``h' = W h + b + U e(t)``                  (DDPM-style time shift)

Time ``t`` may be a scalar (one time for the whole batch, as inside an ODE
solve) or a ``(B,)`` tensor (one time per sample, as in score matching and
flow matching). Smooth activations (tanh, softplus, swish) keep adaptive
solvers cheap. With ``time_embedding`` the layers see features ``e(t)``
(sinusoidal or Fourier, :mod:`cnf.diffusion.nets`) instead of the raw time.

For images, :data:`CONV_LAYERS` holds the convolutional counterparts under
the same names (``ignore``, ``concat`` — time as a constant input channel —,
``squash``, ``concatsquash``, ``blend``; 3×3, stride 1, padding 1) and
:class:`TimeConvNet` stacks them: the vector field of FFJORD's image CNFs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnf.fused_trace import (
    FUSED_ACTIVATIONS,
    FUSED_LAYERS,
    PackedTrace,
    flat_params,
    fused_params,
    fused_spec,
    fused_trace,
    packed_spec,
)
from cnf.registry import Registry


def _time_column(t: Tensor | float, x: Tensor) -> Tensor:
    """Return ``t`` as a ``(1, 1)`` or ``(B, 1)`` tensor matching ``x``'s dtype/device."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, 1)


class TimeLayer(nn.Module):
    """Base class: ``forward(tt, x)`` with ``x`` ``(B, in_dim)`` and time features ``tt``.

    ``tt`` is ``(1, time_dim)`` (one time for the batch, as inside an ODE solve)
    or ``(B, time_dim)``: the raw time as one column (``time_dim = 1``), or a
    time embedding computed once per network call.

    ``forward_tangent(tt, x, dx)`` returns the output and the layer's Jacobian
    applied to tangents ``dx`` of shape ``(K, B or 1, in_dim)`` (the layer is
    affine in ``x``); :meth:`TimeMLP.forward_with_jacobian` uses it for
    forward-mode Jacobians.
    """

    def __init__(self, in_dim: int, out_dim: int, time_dim: int = 1):
        super().__init__()
        self.in_dim, self.out_dim, self.time_dim = in_dim, out_dim, time_dim

    def zero_(self) -> None:
        """Make the layer output 0 (an identity flow's last layer); gates stay random."""
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)


class IgnoreLinear(TimeLayer):
    def __init__(self, in_dim: int, out_dim: int, time_dim: int = 1):
        super().__init__(in_dim, out_dim, time_dim)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, tt: Tensor, x: Tensor) -> Tensor:
        return self.linear(x)

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        return self.linear(x), F.linear(dx, self.linear.weight)


class ConcatLinear(TimeLayer):
    def __init__(self, in_dim: int, out_dim: int, time_dim: int = 1):
        super().__init__(in_dim, out_dim, time_dim)
        self.linear = nn.Linear(in_dim + time_dim, out_dim)

    def forward(self, tt: Tensor, x: Tensor) -> Tensor:
        return self.linear(torch.cat([tt.expand(x.shape[0], -1), x], dim=1))

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward(tt, x), F.linear(dx, self.linear.weight[:, self.time_dim :])


class SquashLinear(TimeLayer):
    def __init__(self, in_dim: int, out_dim: int, time_dim: int = 1):
        super().__init__(in_dim, out_dim, time_dim)
        self.linear = nn.Linear(in_dim, out_dim)
        self.gate = nn.Linear(time_dim, out_dim)

    def forward(self, tt: Tensor, x: Tensor) -> Tensor:
        return self.linear(x) * torch.sigmoid(self.gate(tt))

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        gate = torch.sigmoid(self.gate(tt))
        return self.linear(x) * gate, F.linear(dx, self.linear.weight) * gate


class ConcatSquashLinear(TimeLayer):
    def __init__(self, in_dim: int, out_dim: int, time_dim: int = 1):
        super().__init__(in_dim, out_dim, time_dim)
        self.linear = nn.Linear(in_dim, out_dim)
        self.gate = nn.Linear(time_dim, out_dim)
        self.shift = nn.Linear(time_dim, out_dim, bias=False)

    def forward(self, tt: Tensor, x: Tensor) -> Tensor:
        return self.linear(x) * torch.sigmoid(self.gate(tt)) + self.shift(tt)

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        gate = torch.sigmoid(self.gate(tt))
        return self.linear(x) * gate + self.shift(tt), F.linear(dx, self.linear.weight) * gate

    def zero_(self) -> None:
        # The gate stays: σ(gate) multiplies a zero map, and a live gate lets training start.
        super().zero_()
        nn.init.zeros_(self.shift.weight)


class AddLinear(TimeLayer):
    """``h' = W h + b + U e(t)``: the time features added as a per-unit shift (DDPM-style MLPs)."""

    def __init__(self, in_dim: int, out_dim: int, time_dim: int = 1):
        super().__init__(in_dim, out_dim, time_dim)
        self.linear = nn.Linear(in_dim, out_dim)
        self.proj = nn.Linear(time_dim, out_dim, bias=False)

    def forward(self, tt: Tensor, x: Tensor) -> Tensor:
        return self.linear(x) + self.proj(tt)

    def zero_(self) -> None:
        super().zero_()
        nn.init.zeros_(self.proj.weight)

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward(tt, x), F.linear(dx, self.linear.weight)


class BlendLinear(TimeLayer):
    def __init__(self, in_dim: int, out_dim: int, time_dim: int = 1):
        if time_dim != 1:
            raise ValueError("the blend layer interpolates in the raw time: no time embedding")
        super().__init__(in_dim, out_dim, time_dim)
        self.linear = nn.Linear(in_dim, out_dim)
        self.linear1 = nn.Linear(in_dim, out_dim)

    def forward(self, tt: Tensor, x: Tensor) -> Tensor:
        y0, y1 = self.linear(x), self.linear1(x)
        return y0 + (y1 - y0) * tt

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        d0, d1 = F.linear(dx, self.linear.weight), F.linear(dx, self.linear1.weight)
        return self.forward(tt, x), d0 + (d1 - d0) * tt

    def zero_(self) -> None:
        for lin in (self.linear, self.linear1):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)


LAYERS: Registry[type[TimeLayer]] = Registry(
    "layer type",
    {
        "ignore": IgnoreLinear,
        "concat": ConcatLinear,
        "squash": SquashLinear,
        "concatsquash": ConcatSquashLinear,
        "blend": BlendLinear,
        "add": AddLinear,
    },
)

ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry(
    "activation",
    {
        "tanh": nn.Tanh,
        "softplus": nn.Softplus,
        "swish": nn.SiLU,
        "elu": nn.ELU,
        "relu": nn.ReLU,
        "selu": nn.SELU,
    },
)


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


def _apply_layers_with_tangents(
    layers: nn.ModuleList, acts: nn.ModuleList, tt: Tensor, x: Tensor, dx: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`_apply_layers` carrying tangents ``dx`` along (forward mode): ``(y, (∂y/∂x) dx)``."""
    h, dh = x, dx
    for i, layer in enumerate(layers):
        h_new, dh = layer.forward_tangent(tt, h, dh)
        if i < len(acts):
            a = h_new
            h_new = acts[i](a)
            dh = _activation_tangent(acts[i], a, h_new, dh)
        h = h_new
    return h, dh


def _apply_layers(layers: nn.ModuleList, acts: nn.ModuleList, tt: Tensor, x: Tensor) -> Tensor:
    """``layer_K(… act_1(layer_1(tt, x)))``: every layer sees the time features, no activation last."""
    h = x
    for i, layer in enumerate(layers):
        h = layer(tt, h)
        if i < len(acts):
            h = acts[i](h)
    return h


class TimeMLP(nn.Module):
    """A time-conditioned MLP ``(t, x) -> y``: the one network for vector fields, scores and drifts.

    Every layer is one of :data:`LAYERS`, fed either the raw time (FFJORD's
    layers) or a time embedding computed once per call and shared by the
    layers (``time_embedding``; e.g. DDPM-style ``add`` layers, the score
    models' default).

    Args:
        in_dim: Input dimension ``D``.
        hidden_dims: Widths of the hidden layers, e.g. ``(64, 64, 64)``.
        out_dim: Output dimension (default ``in_dim``).
        layer: Layer type of the hidden layers (and of the output layer unless ``out_layer``).
        activation: One of :data:`ACTIVATIONS`.
        zero_init: Zero the last layer so the field starts at 0 (identity flow).
        out_layer: Layer type of the output layer (default: ``layer``).
        time_embedding: None (the raw time, one column) or a
            :data:`cnf.diffusion.nets.TIME_EMBEDDINGS` name.
        embed_dim, embed_scale: Width and frequency scale of the embedding.
        compile_trace: Evaluate :meth:`forward_with_trace` (the exact trace in a
            solve) by the fused pass through ``torch.compile``
            (:mod:`cnf.fused_trace`): fewer operator calls per evaluation, after
            a compilation on the first call.

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
        out_layer: str | None = None,
        time_embedding: str | None = None,
        embed_dim: int = 32,
        embed_scale: float | None = None,
        compile_trace: bool = False,
    ):
        super().__init__()
        act_cls = ACTIVATIONS[activation]
        self.embed = None
        time_dim = 1
        if time_embedding is not None:
            from cnf.diffusion.nets import build_time_embedding

            self.embed = build_time_embedding(time_embedding, embed_dim, scale=embed_scale)
            time_dim = self.embed.dim
        dims = [in_dim, *hidden_dims, out_dim or in_dim]
        kinds = [layer] * (len(dims) - 2) + [out_layer or layer]
        self.layers = nn.ModuleList(
            LAYERS[k](a, b, time_dim) for k, a, b in zip(kinds, dims[:-1], dims[1:])
        )
        self.acts = nn.ModuleList(act_cls() for _ in dims[1:-1])
        if zero_init:
            self.layers[-1].zero_()
        self._fused_spec = None if self.embed is not None else fused_spec(self.layers, self.acts)
        if compile_trace and self._fused_spec is None:
            raise ValueError(
                f"compile_trace: the compiled exact trace needs layer among {', '.join(FUSED_LAYERS)}, "
                f"activation among {', '.join(FUSED_ACTIVATIONS)} and no time embedding; "
                f"got layer={layer}, activation={activation}, time_embedding={time_embedding}"
            )
        self.compile_trace = compile_trace

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Checkpoints of the former score MLP (linears.i / time_proj.i / out).
        for k in [k for k in state_dict if k.startswith(prefix + "linears.")]:
            i, rest = k[len(prefix) + len("linears.") :].split(".", 1)
            state_dict[f"{prefix}layers.{i}.linear.{rest}"] = state_dict.pop(k)
        for k in [k for k in state_dict if k.startswith(prefix + "time_proj.")]:
            i, rest = k[len(prefix) + len("time_proj.") :].split(".", 1)
            state_dict[f"{prefix}layers.{i}.proj.{rest}"] = state_dict.pop(k)
        for k in [k for k in state_dict if k.startswith(prefix + "out.")]:
            state_dict[f"{prefix}layers.{len(self.layers) - 1}.linear.{k[len(prefix) + 4 :]}"] = (
                state_dict.pop(k)
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def time_features(self, t: Tensor | float, x: Tensor) -> Tensor:
        """``(1 or B, time_dim)``: the raw time column, or its embedding."""
        tt = _time_column(t, x)
        if self.embed is not None:
            tt = self.embed(tt.reshape(-1))
        return tt

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        return _apply_layers(self.layers, self.acts, self.time_features(t, x), x)

    def forward_with_trace(
        self, t: Tensor | float, x: Tensor, *, frobenius: bool = False, path: str | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Output, exact Jacobian trace ``(B,)`` and optionally ``‖∂f/∂x‖_F²`` ``(B,)``.

        ``path``: ``layered`` (forward mode through the layers), ``fused``
        (:class:`cnf.fused_trace.FusedTrace`: the whole pass as one autograd
        node, once differentiable) or ``compiled`` (the fused pass through
        ``torch.compile``). The default is ``compiled`` when the network was
        built with ``compile_trace``, else ``layered``. The fused passes need
        one time for the batch (as inside a solve); with one time per sample
        the layered path runs.
        """
        path = path or ("compiled" if self.compile_trace else "layered")
        if path != "layered":
            tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
            if self._fused_spec is None:
                raise ValueError(
                    f"forward_with_trace: path={path} needs layers among {', '.join(FUSED_LAYERS)} "
                    f"with {' or '.join(FUSED_ACTIVATIONS)} and the raw time"
                )
            if tt.numel() == 1 and x.dim() == 2:
                return fused_trace(
                    x,
                    tt,
                    self._fused_spec,
                    fused_params(self.layers),
                    frobenius=frobenius,
                    compiled=path == "compiled",
                )
        f, jac = self.forward_with_jacobian(t, x)
        div = torch.einsum("bii->b", jac.transpose(0, 1))
        return f, div, (jac.pow(2).sum(dim=(0, 2)) if frobenius else None)

    def packed_derivative(self) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None:
        """The CNF derivative on a packed state, for :func:`cnf.solve.integrate`; None without ``compile_trace``.

        ``(y, s, t0, span) -> [f·span | tr ∂f/∂z·span]`` with ``y = [z | logdet]``
        ``(B, D + 1)`` and the time ``t0 + span·s``: one compiled autograd node
        per evaluation (:class:`cnf.fused_trace.PackedTrace`).
        """
        if not self.compile_trace:
            return None
        # Built per solve: the parameters are the same tensors for all its
        # evaluations (concatenated here once, their gradients split once at
        # the end of the backward pass), and the times are 0-dim
        # (cnf.solve.PackedDynamics).
        params = fused_params(self.layers)
        spec, flat = packed_spec(self._fused_spec, params), flat_params(params)

        def derivative(y: Tensor, s: Tensor, t0: Tensor, span: Tensor) -> Tensor:
            return PackedTrace.apply(y, s, t0, span, spec, True, flat)

        return derivative

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
        # Tangents of the input: the identity, one column per input coordinate.
        # Shape (D, 1, D): until the first activation the tangents are the same
        # for every sample, so they broadcast over the batch for free.
        eye = torch.eye(d, dtype=x.dtype, device=x.device).unsqueeze(1)
        h, dh = _apply_layers_with_tangents(
            self.layers, self.acts, self.time_features(t, x), x, eye
        )
        return h, dh.expand(d, x.shape[0], dh.shape[-1])

    def forward_with_jvp(self, t: Tensor | float, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Output and Jacobian–vector products ``(∂f/∂x) v_k`` of ``K`` tangents ``v`` ``(K, B, D)``.

        Forward mode, as :meth:`forward_with_jacobian` with ``v`` for the
        identity: Hutchinson's ``εᵀ(∂f/∂x)ε`` without an ``autograd.grad`` call
        (:class:`cnf.divergence.HutchinsonDivergence`).
        """
        return _apply_layers_with_tangents(self.layers, self.acts, self.time_features(t, x), x, v)


# ------------------------------------------------------------ convolutional layers
class TimeConv2d(nn.Module):
    """Base class of the convolutional time layers: ``forward(tt, x)`` on ``(B, C, H, W)``.

    The convolutional counterparts of :data:`LAYERS` (FFJORD's image
    networks): 3×3 kernels, stride 1, padding 1, so the spatial size is kept.
    ``tt`` is ``(1, time_dim)`` (one time for the batch, inside an ODE solve)
    or ``(B, time_dim)``; time-dependent gates and shifts act per channel.

    ``forward_tangent(tt, x, dx)`` returns the output and the layer's Jacobian
    applied to tangents ``dx`` of shape ``(K, B, C, H, W)`` (every layer is
    affine in ``x``), as :class:`TimeLayer` does for vectors;
    :meth:`TimeConvNet.forward_with_jvp` uses it.

    Args:
        in_channels, out_channels: Channels of the input and output.
        time_dim: Width of the time features (1: the raw time).
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int = 1):
        super().__init__()
        self.in_channels, self.out_channels, self.time_dim = in_channels, out_channels, time_dim
        self.conv = _conv3x3(in_channels, out_channels)

    def zero_(self) -> None:
        """Make the layer output 0 (an identity flow's last layer); gates stay random."""
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)


def _conv_tangent(dx: Tensor, weight: Tensor) -> Tensor:
    """The linear part ``W * dx`` of a 3×3 layer on tangents ``(K, B, C, H, W)``: one batched convolution."""
    out = F.conv2d(dx.flatten(0, 1), weight, padding=1)
    return out.unflatten(0, dx.shape[:2])


def _per_channel(v: Tensor) -> Tensor:
    """``(1 or B, C) -> (1 or B, C, 1, 1)``: one value per channel, broadcast over the pixels."""
    return v[:, :, None, None]


class IgnoreConv2d(TimeConv2d):
    """``h' = W * h + b`` (time-independent)."""

    def forward(self, tt: Tensor, x: Tensor) -> Tensor:
        return self.conv(x)

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        return self.conv(x), _conv_tangent(dx, self.conv.weight)


class ConcatConv2d(TimeConv2d):
    """``h' = W * [t, h] + b``: the time as constant input channel(s), FFJORD's ``concat``.

    One convolution over ``time_dim + C`` channels (time first). It is
    evaluated as ``W_h * h + W_t * t`` — the convolution of a constant image is
    computed on one image and broadcast over the batch — which equals the
    convolution of the concatenation, zero padding included, without copying
    the batch into a wider tensor at every layer.
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int = 1):
        super().__init__(in_channels, out_channels, time_dim)
        self.conv = _conv3x3(in_channels + time_dim, out_channels)

    def forward(self, tt: Tensor, x: Tensor) -> Tensor:
        w = self.conv.weight
        k = self.time_dim
        out = F.conv2d(x, w[:, k:], self.conv.bias, padding=1)
        plane = _per_channel(tt).expand(tt.shape[0], k, *x.shape[2:])
        return out + F.conv2d(plane, w[:, :k], padding=1)

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward(tt, x), _conv_tangent(dx, self.conv.weight[:, self.time_dim :])


class SquashConv2d(TimeConv2d):
    """``h' = (W * h + b) ⊙ σ(W_g t + b_g)`` (a time gate per output channel)."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int = 1):
        super().__init__(in_channels, out_channels, time_dim)
        self.gate = nn.Linear(time_dim, out_channels)

    def forward(self, tt: Tensor, x: Tensor) -> Tensor:
        return self.conv(x) * _per_channel(torch.sigmoid(self.gate(tt)))

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        gate = _per_channel(torch.sigmoid(self.gate(tt)))
        return self.conv(x) * gate, _conv_tangent(dx, self.conv.weight) * gate


class ConcatSquashConv2d(SquashConv2d):
    """``h' = (W * h + b) ⊙ σ(W_g t + b_g) + W_b t`` (FFJORD's ``concatsquash``)."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int = 1):
        super().__init__(in_channels, out_channels, time_dim)
        self.shift = nn.Linear(time_dim, out_channels, bias=False)

    def forward(self, tt: Tensor, x: Tensor) -> Tensor:
        return super().forward(tt, x) + _per_channel(self.shift(tt))

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        out, dout = super().forward_tangent(tt, x, dx)
        return out + _per_channel(self.shift(tt)), dout

    def zero_(self) -> None:
        super().zero_()
        nn.init.zeros_(self.shift.weight)


class BlendConv2d(TimeConv2d):
    """``h' = (1 − t)(W₀ * h + b₀) + t (W₁ * h + b₁)`` (raw time only)."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int = 1):
        if time_dim != 1:
            raise ValueError("the blend layer interpolates in the raw time: no time embedding")
        super().__init__(in_channels, out_channels, time_dim)
        self.conv1 = _conv3x3(in_channels, out_channels)

    def forward(self, tt: Tensor, x: Tensor) -> Tensor:
        y0 = self.conv(x)
        return y0 + (self.conv1(x) - y0) * _per_channel(tt)

    def forward_tangent(self, tt: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        d0, d1 = _conv_tangent(dx, self.conv.weight), _conv_tangent(dx, self.conv1.weight)
        return self.forward(tt, x), d0 + (d1 - d0) * _per_channel(tt)

    def zero_(self) -> None:
        super().zero_()
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)


#: The convolutional layer types, under the names of their :data:`LAYERS` counterparts.
CONV_LAYERS: Registry[type[TimeConv2d]] = Registry(
    "convolutional layer type",
    {
        "ignore": IgnoreConv2d,
        "concat": ConcatConv2d,
        "squash": SquashConv2d,
        "concatsquash": ConcatSquashConv2d,
        "blend": BlendConv2d,
    },
)


class TimeConvNet(nn.Module):
    """A time-conditioned CNN ``(t, x) -> y`` on images: the vector field of image CNFs.

    ``len(hidden_dims) + 1`` layers of :data:`CONV_LAYERS` (3×3, stride 1,
    padding 1), the activation between them; the last layer maps back to the
    ``C`` channels of the state. FFJORD's multi-scale models use ``concat``
    layers with hidden channels ``(64, 64, 64)`` and softplus.

    Args:
        channels: Channels ``C`` of the state (in and out).
        hidden_dims: Channels of the hidden layers, e.g. ``(64, 64, 64)``.
        layer: One of :data:`CONV_LAYERS`.
        activation: One of :data:`ACTIVATIONS`.
        zero_init: Zero the last layer so the field starts at 0 (identity flow; RNODE).

    Shapes: ``t`` scalar or ``(B,)``; ``x`` and the output ``(B, C, H, W)``.

    References:
        Grathwohl et al., "FFJORD", ICLR 2019, §4 and Appendix B (docs/methods.md §3).
    """

    def __init__(
        self,
        channels: int,
        hidden_dims: Sequence[int] = (64, 64, 64),
        *,
        layer: str = "concat",
        activation: str = "softplus",
        zero_init: bool = False,
    ):
        super().__init__()
        dims = [channels, *hidden_dims, channels]
        layer_cls = CONV_LAYERS[layer]
        self.layers = nn.ModuleList(layer_cls(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(ACTIVATIONS[activation]() for _ in hidden_dims)
        if zero_init:
            self.layers[-1].zero_()

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        return _apply_layers(self.layers, self.acts, _time_column(t, x), x)

    def forward_with_jvp(self, t: Tensor | float, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Output and Jacobian–vector products ``(∂f/∂x) v_k`` of ``K`` tangents ``v`` ``(K, B, C, H, W)``.

        Forward mode: the tangents run through the same layers (one batched
        convolution per layer for all ``K``), so Hutchinson's ``εᵀ(∂f/∂x)ε``
        needs no ``autograd.grad`` call and training back-propagates through
        one ordinary graph instead of a double-backward one
        (:class:`cnf.divergence.HutchinsonDivergence`).
        """
        return _apply_layers_with_tangents(self.layers, self.acts, _time_column(t, x), x, v)
