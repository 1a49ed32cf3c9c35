"""The exact trace of a time-conditioned MLP in one autograd node.

Inside an ODE solve every sample shares one time ``t``, and every layer of
:class:`cnf.nets.TimeMLP` of the types in :data:`FUSED_LAYERS` is then

    a = (h Wᵀ + b) ⊙ g(t) + s(t),   g = σ(w_g t + b_g) or 1,   s = w_s t or 0

(``concat``'s time column is the shift ``w_s t``). The field ``f`` and its
Jacobian ``J = ∂f/∂x`` come from one pass that carries a stack of ``D + 1``
rows per sample — the state and its ``D`` tangents, starting from the
identity — through one matrix product per layer; the activation scales the
tangent rows by ``act'(a)``. ``tr J`` and ``‖J‖_F²`` are read off the last
stack.

:class:`FusedTrace` runs this pass without recording a graph and
differentiates it by hand: the adjoint of the recurrence, with the tangents'
dependence on ``a`` (the activation's second derivative), the gates'
sigmoid, and the time, which every gate and shift sees. Backprop through a
solve then walks one node per function evaluation instead of about a
hundred: for the 2-D toy CNF the cost is the number of operators, not their
arithmetic (``experiments/profile_ffjord.py``). The backward pass is
once-differentiable — what backprop through the solver and the adjoint's
vector–Jacobian products need; a double backward raises.

:class:`PackedTrace` wraps the same passes for a solve's packed state
``[z | logdet]``: the derivative ``[f·span | tr J·span]`` at ``t0 + span·s``
in one node, so the solver carries one tensor instead of a tuple.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

#: Layer types with the form above, by the names of :data:`cnf.nets.LAYERS`.
FUSED_LAYERS = ("ignore", "concat", "squash", "concatsquash")
#: Parameters per layer in :class:`FusedTrace`'s order (:func:`fused_params`).
_N_PARAMS = {"ignore": 2, "concat": 2, "squash": 4, "concatsquash": 5}
#: Activations with a rule here: ``act'`` and ``act''/act'`` from the output (tanh)
#: or from ``σ(βa)`` (softplus), so no pre-activation need be kept.
FUSED_ACTIVATIONS = ("tanh", "softplus")


def _layer_maps(kind: str, params: tuple[Tensor, ...], t: Tensor):  # noqa: ANN202
    """``(W, b, g or None, s or None)`` of one layer at time ``t`` (0-dim)."""
    if kind == "ignore":
        w, b = params
        return w, b, None, None
    if kind == "concat":
        w, b = params
        return w[:, 1:], b, None, w[:, 0] * t
    w, b, wg, bg = params[:4]
    g = torch.sigmoid(torch.addcmul(bg, wg[:, 0], t))
    return w, b, g, (params[4][:, 0] * t if kind == "concatsquash" else None)


def _activate(kind: str, beta: float, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``act(a)``, ``act'(a)`` and ``act''(a) / act'(a)``."""
    if kind == "tanh":
        y = torch.tanh(a)
        return y, torch.addcmul(torch.ones_like(y), y, y, value=-1.0), y * -2.0
    sig = torch.sigmoid(a * beta)
    return torch.nn.functional.softplus(a, beta=beta), sig, (1.0 - sig) * beta


def _fused_forward(x: Tensor, t: Tensor, params: list[Tensor], spec: tuple):  # noqa: ANN202
    """The pass of :class:`FusedTrace`: ``(f, div, frob, jac, saved)``, no graph recorded."""
    kinds, act, beta, frobenius = spec
    groups = _split(params, kinds)
    d, depth = x.shape[1], len(kinds)
    saved: list[Tensor] = []
    h = x
    for li, (kind, p) in enumerate(zip(kinds, groups)):
        w, b, g, s = _layer_maps(kind, p, t)
        if li == 0:
            # Row 0 the state, rows 1..D the identity's images: the columns of
            # Wᵀ, the same for every sample until the first activation.
            u0 = torch.addmm(b, x, w.t())
            ut = w.t().unsqueeze(1)  # (D, 1, out)
        else:
            u = torch.matmul(h, w.t())
            u0, ut = u[0] + b, u[1:]
        if g is None:
            p0, pt = u0, ut
        else:
            p0, pt = u0 * g, ut * g
            # (The first layer's tangent rows are Wᵀ itself: not kept.)
            saved += [u0, ut] if li else [u0]
        if s is not None:
            p0 = p0 + s
        if li < depth - 1:
            y, dy, _ratio = _activate(act, beta, p0)
            h = torch.cat([y.unsqueeze(0), pt * dy])
            # tanh's act' and act''/act' follow from its output h[0]; softplus's from act'.
            saved += [h] if act == "tanh" else [h, dy]
    f = p0
    jac = pt.expand(d, *f.shape)  # jac[i, b, j] = ∂f_j/∂x_i
    div = torch.diagonal(jac, dim1=0, dim2=2).sum(-1)
    frob = jac.pow(2).sum(dim=(0, 2)) if frobenius else f.new_zeros(0)
    return f, div, frob, jac, saved


def _fused_backward(  # noqa: ANN202
    grad_f: Tensor,
    grad_div: Tensor,
    grad_frob: Tensor,
    x: Tensor,
    t: Tensor,
    jac: Tensor | None,
    params: list[Tensor],
    saved: list[Tensor],
    spec: tuple,
):
    """The adjoint of :func:`_fused_forward`: ``(grad_x, grad_t, parameter grads)``."""
    kinds, act, beta, frobenius = spec
    groups = _split(params, kinds)
    d, depth = x.shape[1], len(kinds)
    # The saved tensors of each layer, in the order the forward pass appended them.
    per_layer: list[dict[str, Tensor]] = []
    j = 0
    for li, kind in enumerate(kinds):
        entry: dict[str, Tensor] = {}
        if kind in ("squash", "concatsquash"):
            entry["u0"] = saved[j]
            if li:
                entry["ut"] = saved[j + 1]
            j += 2 if li else 1
        if li < depth - 1:
            entry["h"] = saved[j]
            if act == "tanh":
                y = entry["h"][0]
                entry["dy"] = torch.addcmul(torch.ones_like(y), y, y, value=-1.0)
                entry["ratio"] = y * -2.0
                j += 1
            else:
                entry["dy"] = saved[j + 1]
                entry["ratio"] = (1.0 - entry["dy"]) * beta
                j += 2
        per_layer.append(entry)
    # The gradient of the last pre-activation stack: row 0 from f, tangent rows
    # from tr J (the diagonal) and ‖J‖_F² (2 J).
    gpt = torch.diag_embed(grad_div.unsqueeze(-1).expand(-1, d))  # (B, D, D): δ_ij
    gpt = gpt.transpose(0, 1)  # (D, B, D)
    if frobenius:
        gpt = gpt + jac * (2.0 * grad_frob).unsqueeze(-1)
    gp0 = grad_f
    grads: list[Tensor] = []
    grad_t = torch.zeros_like(t)
    for li in range(depth - 1, -1, -1):
        # gp0, gpt: the gradient with respect to this layer's pre-activation stack.
        kind, p = kinds[li], groups[li]
        w, _b, g, _s = _layer_maps(kind, p, t)
        gs = gp0.sum(0) if kind in ("concat", "concatsquash") else None
        gg = None
        if li == 0:
            gpt = gpt.sum(1)  # the tangent rows of the first layer are the same for every sample
        if g is not None:
            u0 = per_layer[li]["u0"]
            ut = per_layer[li]["ut"] if li else w.t()
            gg = (gp0 * u0).sum(0) + (gpt * ut).reshape(-1, ut.shape[-1]).sum(0)
            gu0, gut = gp0 * g, gpt * g
        else:
            gu0, gut = gp0, gpt
        if li == 0:
            gw = torch.addmm(gut.t(), gu0.t(), x)
            grad_x = gu0 @ w
        else:
            prev = per_layer[li - 1]
            h_in = prev["h"]
            gu = torch.cat([gu0.unsqueeze(0), gut])
            gw = gu.reshape(-1, gu.shape[-1]).t() @ h_in.reshape(-1, h_in.shape[-1])
            gh = torch.matmul(gu, w)
            # Through the activation of the layer below: tangent rows scale by
            # act'; the state row also collects the tangents' dependence on a
            # (act'' = act' · ratio, and a tangent row times act' is h's).
            coupling = (gh[1:] * h_in[1:]).sum(0) * prev["ratio"]
            gp0 = gh[0] * prev["dy"] + coupling
            gpt = gh[1:] * prev["dy"]
        layer_grads, grad_t = _param_grads(kind, p, t, gw, gu0.sum(0), gg, g, gs, grad_t)
        grads = layer_grads + grads
    return grad_x, grad_t, grads


def _split(params: list[Tensor], kinds: tuple[str, ...]) -> list[list[Tensor]]:
    groups, i = [], 0
    for kind in kinds:
        groups.append(list(params[i : i + _N_PARAMS[kind]]))
        i += _N_PARAMS[kind]
    return groups


class FusedTrace(torch.autograd.Function):
    """``(f, tr J, ‖J‖_F² or an empty tensor)`` of an MLP at one time.

    ``apply(x, t, spec, compiled, *params)``: ``x`` ``(B, D)``, ``t`` 0-dim,
    ``spec`` a tuple ``(kinds, activation, beta, frobenius)`` with one
    :data:`FUSED_LAYERS` name per layer, ``params`` the layers' parameters in
    order (``concatsquash``: weight, bias, gate weight, gate bias, shift
    weight; ``squash`` without the shift; ``concat`` and ``ignore``: weight,
    bias). The activation follows every layer but the last. ``compiled``:
    run both passes through ``torch.compile`` (:func:`_passes`).
    """

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, spec: tuple, compiled: bool, *params: Tensor):  # noqa: ANN001, ANN205
        forward, _ = _passes(compiled)
        # Detached: the first evaluation of a solve sees a state without grad,
        # later ones a state with it; the pass is the same (no graph is
        # recorded here), and one compiled program serves both.
        x, t = x.detach(), t.detach()
        f, div, frob, jac, saved = forward(x, t, list(params), spec)
        ctx.spec, ctx.n_params, ctx.compiled = spec, len(params), compiled
        ctx.save_for_backward(x, t, jac, *params, *saved)
        return f, div, frob

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f: Tensor, grad_div: Tensor, grad_frob: Tensor):  # noqa: ANN001, ANN205
        x, t, jac, *rest = ctx.saved_tensors
        params, saved = rest[: ctx.n_params], rest[ctx.n_params :]
        _, backward = _passes(ctx.compiled)
        grad_x, grad_t, grads = backward(
            grad_f, grad_div, grad_frob, x, t, jac, list(params), list(saved), ctx.spec
        )
        return (grad_x, grad_t, None, None, *grads)


_COMPILED: dict[bool, tuple] = {}


def _passes(compiled: bool, packed: bool = False):  # noqa: ANN202
    """The forward and backward passes, eager or through ``torch.compile`` (built once, on first use).

    ``packed``: those of :class:`PackedTrace` instead of :class:`FusedTrace`.
    Compiled, each pass is one generated kernel program per shape and dtype
    instead of a hundred operator calls: the toy CNF's cost is per operator,
    not arithmetic. Compilation happens on the first call (tens of seconds
    with a cold cache; inductor caches the result on disk for later runs).
    """
    eager = (_packed_forward, _packed_backward) if packed else (_fused_forward, _fused_backward)
    if not compiled:
        return eager
    if packed not in _COMPILED:
        # size_asserts off: the generated code would re-check every input's
        # sizes and strides at each call, which dynamo's guards already did.
        _COMPILED[packed] = tuple(
            torch.compile(fn, fullgraph=True, options={"size_asserts": False}) for fn in eager
        )
    return _COMPILED[packed]


def _param_grads(  # noqa: ANN202
    kind: str,
    p: list[Tensor],
    t: Tensor,
    gw: Tensor,
    gb: Tensor,
    gg: Tensor | None,
    g: Tensor | None,
    gs: Tensor | None,
    grad_t: Tensor,
):
    """One layer's parameter gradients from those of ``W``, ``b``, ``g``, ``s``, and ``grad_t`` updated."""
    if kind == "ignore":
        return [gw, gb], grad_t
    if kind == "concat":
        w = p[0]
        gfull = torch.cat([(gs * t).unsqueeze(1), gw], dim=1)
        return [gfull, gb], grad_t + torch.dot(gs, w[:, 0])
    wg = p[2]
    gz = gg * g * (1.0 - g)  # through the sigmoid
    out = [gw, gb, (gz * t).unsqueeze(1), gz]
    grad_t = grad_t + torch.dot(gz, wg[:, 0])
    if kind == "concatsquash":
        out.append((gs * t).unsqueeze(1))
        grad_t = grad_t + torch.dot(gs, p[4][:, 0])
    return out, grad_t


def _unflatten(flat: Tensor, shapes: tuple[tuple[int, ...], ...]) -> list[Tensor]:
    """Views of ``flat`` with the parameters' shapes (:func:`packed_trace`'s order)."""
    sizes = [math.prod(shape) for shape in shapes]
    return [part.view(shape) for part, shape in zip(torch.split(flat, sizes), shapes)]


def _packed_forward(y: Tensor, s: Tensor, t0: Tensor, span: Tensor, flat: Tensor, spec: tuple):  # noqa: ANN202
    """The pass of :class:`PackedTrace`: ``(dy, f, div, saved)`` (no Frobenius norm, so no Jacobian kept)."""
    fspec, shapes = spec
    d = y.shape[1] - 1
    f, div, _frob, _jac, saved = _fused_forward(
        y[:, :d], t0 + span * s, _unflatten(flat, shapes), fspec
    )
    dy = torch.cat([f * span, (div * span).unsqueeze(1)], dim=1)
    return dy, f, div, saved


def _packed_backward(  # noqa: ANN202
    grad: Tensor,
    y: Tensor,
    s: Tensor,
    t0: Tensor,
    span: Tensor,
    f: Tensor,
    div: Tensor,
    flat: Tensor,
    saved: list[Tensor],
    spec: tuple,
):
    """The adjoint of :func:`_packed_forward`: ``(grad_y, grad_s, grad_t0, grad_span, grad_flat)``."""
    fspec, shapes = spec
    d = y.shape[1] - 1
    gf, gdiv = grad[:, :d], grad[:, d]
    grad_x, grad_t, grads = _fused_backward(
        gf * span,
        gdiv * span,
        gdiv.new_zeros(0),
        y[:, :d],
        t0 + span * s,
        None,
        _unflatten(flat, shapes),
        saved,
        fspec,
    )
    grad_span = (gf * f).sum() + torch.dot(gdiv, div) + grad_t * s
    # The derivative does not depend on the log-determinant column.
    grad_y = torch.cat([grad_x, torch.zeros_like(gdiv).unsqueeze(1)], dim=1)
    grad_flat = torch.cat([g.reshape(-1) for g in grads])
    return grad_y, grad_t * span, grad_t, grad_span, grad_flat


class PackedTrace(torch.autograd.Function):
    """The CNF's augmented derivative on one packed state, in one autograd node.

    ``apply(y, s, t0, span, spec, compiled, flat)``: ``y`` ``(B, D + 1)`` is
    ``[z | log-determinant]``, ``s`` the solver's time in ``[0, 1]`` and the
    model time ``t = t0 + span·s`` (0-dim tensors); returns
    ``[f(t, z)·span | tr ∂f/∂z·span]``, ``(B, D + 1)``. ``flat`` holds
    :class:`FusedTrace`'s parameters end to end and ``spec`` is the pair
    (:class:`FusedTrace`'s spec with ``frobenius`` false, the parameters'
    shapes); see :func:`packed_trace`. One tensor state instead of the tuple
    ``(z, logdet)`` spares torchdiffeq's split and concatenation, the time
    and span scaling their own operators, and one flat parameter vector
    (concatenated once per solve) the per-evaluation guards, gradient
    buffers and accumulations of each parameter
    (:func:`cnf.solve.integrate` uses it where the field offers it).
    """

    @staticmethod
    def forward(ctx, y, s, t0, span, spec, compiled, flat):  # noqa: ANN001, ANN205
        forward, _ = _passes(compiled, packed=True)
        # Detached (as in FusedTrace): one compiled program for states with and without grad.
        y, s, t0, span, flat = y.detach(), s.detach(), t0.detach(), span.detach(), flat.detach()
        dy, f, div, saved = forward(y, s, t0, span, flat, spec)
        ctx.spec, ctx.compiled = spec, compiled
        ctx.save_for_backward(y, s, t0, span, f, div, flat, *saved)
        return dy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        y, s, t0, span, f, div, flat, *saved = ctx.saved_tensors
        _, backward = _passes(ctx.compiled, packed=True)
        grad_y, grad_s, grad_t0, grad_span, grad_flat = backward(
            grad, y, s, t0, span, f, div, flat, list(saved), ctx.spec
        )
        return grad_y, grad_s, grad_t0, grad_span, None, None, grad_flat


def packed_spec(spec: tuple[tuple[str, ...], str, float], params: list[Tensor]) -> tuple:
    """:class:`PackedTrace`'s ``spec`` for :func:`fused_spec`'s ``spec`` and the parameters."""
    return (*spec, False), tuple(tuple(p.shape) for p in params)


def flat_params(params: list[Tensor]) -> Tensor:
    """The parameters end to end, one vector (differentiable: its gradient flows back to each)."""
    return torch.cat([p.reshape(-1) for p in params])


def packed_trace(
    y: Tensor,
    s: Tensor,
    t0: Tensor,
    span: Tensor,
    spec: tuple[tuple[str, ...], str, float],
    params: list[Tensor],
    *,
    compiled: bool = False,
) -> Tensor:
    """``[f·span | tr ∂f/∂z·span]`` of the packed state ``y = [z | logdet]`` by :class:`PackedTrace`.

    ``spec`` is :func:`fused_spec`'s, ``params`` :func:`fused_params`'s.
    """
    return PackedTrace.apply(
        y,
        s.reshape(()),
        t0.reshape(()),
        span.reshape(()),
        packed_spec(spec, params),
        bool(compiled),
        flat_params(params),
    )


def fused_spec(layers, acts) -> tuple[tuple[str, ...], str, float] | None:  # noqa: ANN001
    """``(kinds, activation, beta)`` of a TimeMLP's layers, or None if the fused pass has no rule.

    ``layers`` and ``acts`` are :class:`cnf.nets.TimeMLP`'s; the raw time must
    be the only time feature (one column).
    """
    from cnf.nets import LAYERS

    names = {LAYERS[name]: name for name in FUSED_LAYERS}
    kinds = tuple(names.get(type(layer)) for layer in layers)
    if None in kinds or any(layer.time_dim != 1 for layer in layers):
        return None
    act_types = {type(a) for a in acts}
    if not act_types or act_types == {torch.nn.Tanh}:
        return kinds, "tanh", 1.0  # (no activation at all with one layer)
    betas = {float(a.beta) for a in acts} if act_types == {torch.nn.Softplus} else set()
    if len(betas) == 1:
        return kinds, "softplus", betas.pop()
    return None


def fused_params(layers) -> list[Tensor]:  # noqa: ANN001
    """The parameters of :func:`fused_spec`'s layers in :class:`FusedTrace`'s order."""
    params = []
    for layer in layers:
        params += [layer.linear.weight, layer.linear.bias]
        gate = getattr(layer, "gate", None)
        if gate is not None:
            params += [gate.weight, gate.bias]
        shift = getattr(layer, "shift", None)
        if shift is not None:
            params.append(shift.weight)
    return params


def fused_trace(
    x: Tensor,
    t: Tensor,
    spec: tuple[tuple[str, ...], str, float],
    params: list[Tensor],
    *,
    frobenius: bool = False,
    compiled: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(f, tr ∂f/∂x, ‖∂f/∂x‖_F² or None)`` by :class:`FusedTrace`.

    ``spec`` is :func:`fused_spec`'s answer for the layers with parameters
    ``params`` (:func:`fused_params`); ``t`` one time (any shape of one
    element) in ``x``'s dtype; ``compiled`` as in :class:`FusedTrace`.
    """
    kinds, act, beta = spec
    spec = (kinds, act, beta, bool(frobenius))
    f, div, frob = FusedTrace.apply(x, t.reshape(()), spec, bool(compiled), *params)
    return f, div, (frob if frobenius else None)
