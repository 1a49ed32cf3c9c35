"""Divergence (Jacobian trace) estimators for the instantaneous change of variables.

For a vector field ``f(z)`` with Jacobian ``A = ∂f/∂z`` the CNF log-density
evolves as ``d log p(z(t))/dt = −tr(A)`` (Chen et al. 2018). Two estimators:

* :class:`ExactDivergence` — the full trace. All ``D`` rows of ``A`` come from
  **one** batched vector–Jacobian product (``is_grads_batched``: autograd's
  vmap over the D basis vectors), not a Python loop of D backward passes.
* :class:`HutchinsonDivergence` — ``tr(A) = E[εᵀAε]`` with ``E[εεᵀ] = I``
  (Hutchinson 1989; FFJORD, Grathwohl et al. 2019). ``εᵀA`` is a single VJP;
  a field that propagates tangents (``forward_with_jvp``: the library's MLP and
  convolutional fields) gives ``Aε`` in forward mode instead — the same
  ``εᵀAε``, with no double-backward graph to train through.
  Gaussian probes have variance ``2‖S‖_F²``, Rademacher probes
  ``2(‖S‖_F² − Σ A_ii²)`` with ``S = (A + Aᵀ)/2`` — never larger.

Both also return the squared Frobenius norm needed by RNODE's Jacobian
regulariser (Finlay et al. 2020): exactly ``‖A‖_F²`` for the exact estimator,
and the unbiased ``‖εᵀA‖²`` (``‖Aε‖²`` in forward mode) for Hutchinson — the
same product as the trace.

The probe is drawn **once per solve** by :meth:`DivergenceEstimator.draw_probe`
and passed back in on every function evaluation of that solve (the adjoint
backward solve included); drawing fresh noise at each evaluation makes the ODE
rough and the NFE explode.

References:
    Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1989.
    Grathwohl et al., "FFJORD", ICLR 2019, arXiv:1810.01367.
    Finlay et al., "How to train your neural ODE", ICML 2020.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cnf.registry import Registry

Field = Callable[[Tensor, Tensor], Tensor]

ProbeKind = Literal["gaussian", "rademacher"]


def sample_probe(
    shape: tuple[int, ...],
    kind: ProbeKind = "gaussian",
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw a probe with ``E[ε] = 0`` and ``E[εεᵀ] = I``.

    Args:
        shape: Output shape.
        kind: ``"gaussian"`` (standard normal) or ``"rademacher"`` (±1).
        generator: Optional generator for reproducible probes.
    """
    if kind == "gaussian":
        return torch.randn(shape, dtype=dtype, device=device, generator=generator)
    if kind == "rademacher":
        bits = torch.randint(0, 2, shape, device=device, generator=generator)
        return bits.to(dtype or torch.get_default_dtype()) * 2 - 1
    raise ValueError(f"unknown probe '{kind}'; valid: gaussian, rademacher")


class DivergenceEstimator:
    """Interface: ``div, frob = est(f, z, probe, create_graph=..., frobenius=...)``.

    Subclasses implement ``__call__(f, z, probe, *, create_graph, frobenius=False)``:
    ``f`` is the field evaluated at ``z`` (``z`` must be part of the graph of
    ``f``); both have shape ``(B, *event)``. It returns ``div`` of shape ``(B,)``
    (``(B, K)`` for a ``per_probe`` estimator) and, if ``frobenius``, the per-sample squared Frobenius norm (else None).
    :meth:`evaluate` evaluates the field and calls it.
    """

    name: str = "base"
    #: Return one divergence per probe, ``(B, K)``, instead of their mean (see
    #: :class:`HutchinsonDivergence`); the solver then integrates K log-determinants.
    per_probe: bool = False

    def draw_probe(self, z: Tensor) -> Tensor | None:
        """Draw the probe used for every evaluation of one solve (None if unused)."""
        return None

    def evaluate(
        self,
        field: Field,
        t: Tensor,
        z: Tensor,
        probe: Tensor | None,
        *,
        frobenius: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Evaluate ``f = field(t, z)`` together with its divergence.

        The graph for the divergence is kept (``create_graph``) exactly when
        gradients are enabled by the caller: backprop through the solver and
        the adjoint's backward solve need it, a no-grad forward solve does not.

        Returns:
            ``(f, div, frob)`` with shapes ``(B, *event)``, ``(B,)`` and
            ``(B,)`` or None.
        """
        fast = self._forward_mode(field, t, z, probe, frobenius=frobenius)
        if fast is not None:
            return fast
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            # Without grad mode (the adjoint's forward solve) z may be a view made
            # under no_grad of a state that requires grad (a CNF block after another
            # flow, or an input we differentiate): autograd cannot differentiate
            # with respect to such a view, so take a fresh leaf.
            if not create_graph or not z.requires_grad:
                z = z.detach().requires_grad_(True)
            f = field(t, z)
            div, frob = self(f, z, probe, create_graph=create_graph, frobenius=frobenius)
        if not create_graph:
            f = f.detach()
        return f, div, frob

    def _forward_mode(
        self, field: Field, t: Tensor, z: Tensor, probe: Tensor | None, *, frobenius: bool
    ) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """``(f, div, frob)`` without autograd when the estimator and field allow it, else None."""
        return None

    def packed_derivative(self, field: Field, z: Tensor) -> Callable[..., Tensor] | None:
        """The field's derivative of the packed state ``[z | logdet]``, or None (see :class:`ExactDivergence`)."""
        return None


class ExactDivergence(DivergenceEstimator):
    """Exact trace from the full Jacobian.

    For vector states ``(B, D)``, :meth:`evaluate` takes the field's
    forward-mode path when it has one: ``forward_with_trace(t, z, frobenius=)``
    (returns ``(f, div, frob)``), else ``forward_with_jacobian(t, z)`` (returns
    ``f`` and ``J`` of shape ``(D, B, D)``, ``J[i, b, j] = ∂f_j/∂z_i``). Otherwise
    the Jacobian comes from D vector–Jacobian products vectorised into one
    backward call. Use it in low dimension (tabular, 2-D); FFJORD evaluates
    images with Hutchinson.
    """

    name = "exact"

    def _forward_mode(
        self, field: Field, t: Tensor, z: Tensor, probe: Tensor | None, *, frobenius: bool
    ) -> tuple[Tensor, Tensor, Tensor | None] | None:
        # Fields that can propagate their Jacobian forward give the exact trace
        # without any autograd.grad call: cheaper in low dimension, and the
        # training backward pass is a plain (not double) backward. One
        # dispatch, in order: ``forward_with_trace`` (TimeMLP: trace and
        # Frobenius norm directly), ``forward_with_jacobian`` (the
        # probability-flow field of score and INDM models: the full Jacobian),
        # else autograd (one batched VJP).
        if z.dim() == 2:
            trace_fn = getattr(field, "forward_with_trace", None)
            if trace_fn is not None:
                return trace_fn(t, z, frobenius=frobenius)
            jac_fn = getattr(field, "forward_with_jacobian", None)
            if jac_fn is not None:
                f, jac = jac_fn(t, z)  # jac[i, b, j] = ∂f_j/∂z_i, shape (D, B, D)
                div = torch.einsum("ibi->b", jac)
                frob = jac.pow(2).sum(dim=(0, 2)) if frobenius else None
                return f, div, frob
        return None

    def packed_derivative(self, field: Field, z: Tensor) -> Callable[..., Tensor] | None:
        # A field that evaluates ``(y, s, t0, span) -> [f·span | tr J·span]`` on
        # one packed tensor (TimeMLP with ``compile_trace``): the solve then
        # carries one state instead of the tuple (z, logdet).
        fn = getattr(field, "packed_derivative", None) if z.dim() == 2 else None
        return fn() if fn is not None else None

    def __call__(
        self,
        f: Tensor,
        z: Tensor,
        probe: Tensor | None = None,
        *,
        create_graph: bool,
        frobenius: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        rows = jacobian_rows(f, z, create_graph=create_graph)  # rows[i, b, j] = ∂f_i/∂z_j
        div = torch.einsum("ibi->b", rows)
        frob = rows.pow(2).sum(dim=(0, 2)) if frobenius else None
        return div, frob


def jacobian_rows(
    f: Tensor, z: Tensor, *, create_graph: bool, retain_graph: bool | None = None
) -> Tensor:
    """All ``D`` rows of ``∂f/∂z`` for every sample from **one** batched VJP.

    Samples must be independent (``f[b]`` depends on ``z[b]`` only), so the VJP
    with basis vector ``e_i`` repeated over the batch gives row ``i`` of every
    sample's Jacobian. Shared by the CNF's exact divergence and the residual
    flows' exact log-determinant.

    Args:
        f: Outputs ``(B, *event)`` computed from ``z`` (same shape).
        z: Inputs ``(B, *event)`` that require grad.
        create_graph: Keep the graph of the rows (to differentiate through them).

    Returns:
        ``rows`` of shape ``(D, B, D)`` with ``rows[i, b, j] = ∂f_i/∂z_j`` at sample ``b``.
    """
    batch = z.shape[0]
    d = z[0].numel()
    eye = torch.eye(d, dtype=f.dtype, device=f.device)
    basis = eye.reshape(d, 1, *z.shape[1:]).expand(d, *z.shape)
    (rows,) = torch.autograd.grad(
        f,
        z,
        grad_outputs=basis,
        create_graph=create_graph,
        retain_graph=retain_graph,
        is_grads_batched=True,
    )
    return rows.reshape(d, batch, d)


class HutchinsonDivergence(DivergenceEstimator):
    """Hutchinson's stochastic trace ``mean_k ε_kᵀ A ε_k`` with ``num_probes`` probes.

    With ``per_probe`` the ``K`` estimates come back side by side, ``(B, K)``:
    a solve then integrates one log-determinant per probe (their mean is the
    ``K``-probe estimate, their spread its standard error; see
    :func:`cnf.evaluation.summarize`). It costs the same single VJP.

    Args:
        probe: ``"gaussian"`` or ``"rademacher"``.
        num_probes: Probes averaged per sample (all in one batched VJP).
        generator: Optional generator for reproducible probes.
        per_probe: Return the ``K`` estimates instead of their mean.
    """

    name = "hutchinson"

    def __init__(
        self,
        probe: ProbeKind = "gaussian",
        *,
        num_probes: int = 1,
        generator: torch.Generator | None = None,
        per_probe: bool = False,
    ):
        if probe not in ("gaussian", "rademacher"):
            raise ValueError(f"unknown probe '{probe}'; valid: gaussian, rademacher")
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {num_probes}")
        self.probe = probe
        self.num_probes = num_probes
        self.generator = generator
        self.per_probe = per_probe

    def draw_probe(self, z: Tensor) -> Tensor:
        return sample_probe(
            (self.num_probes, *z.shape),
            self.probe,
            dtype=z.dtype,
            device=z.device,
            generator=self.generator,
        )

    def _forward_mode(
        self, field: Field, t: Tensor, z: Tensor, probe: Tensor | None, *, frobenius: bool
    ) -> tuple[Tensor, Tensor, Tensor | None] | None:
        # A field with ``forward_with_jvp`` (TimeMLP, TimeConvNet) carries the
        # probes forward as tangents: ``εᵀ(Aε)`` is the same number as ``(εᵀA)ε``,
        # without an autograd.grad call, and training back-propagates through an
        # ordinary graph instead of a double-backward one (cheaper per
        # evaluation, e.g. for FFJORD's convolutional fields).
        jvp_fn = getattr(field, "forward_with_jvp", None)
        if jvp_fn is None or probe is None:
            return None
        f, jvp = jvp_fn(t, z, probe)
        return (f, *self._reduce(jvp, probe, frobenius=frobenius))

    def _reduce(
        self, products: Tensor, probe: Tensor, *, frobenius: bool
    ) -> tuple[Tensor, Tensor | None]:
        """``(div, frob)`` from the ``K`` products ``εᵀA`` (or ``Aε``) of the probes ``ε``."""
        k, batch = probe.shape[0], probe.shape[1]
        products = products.reshape(k, batch, -1)
        per_probe = (products * probe.reshape(k, batch, -1)).sum(dim=2)  # (K, B)
        div = per_probe.T if self.per_probe else per_probe.mean(dim=0)
        # ‖εᵀA‖² and ‖Aε‖² are both unbiased for ‖A‖_F² (E[εεᵀ] = I).
        frob = products.pow(2).sum(dim=2).mean(dim=0) if frobenius else None
        return div, frob

    def __call__(
        self,
        f: Tensor,
        z: Tensor,
        probe: Tensor | None,
        *,
        create_graph: bool,
        frobenius: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if probe is None:
            raise ValueError("HutchinsonDivergence needs the probe drawn for this solve")
        if self.num_probes == 1:
            (vjp,) = torch.autograd.grad(f, z, grad_outputs=probe[0], create_graph=create_graph)
            vjp = vjp.unsqueeze(0)
        else:
            (vjp,) = torch.autograd.grad(
                f, z, grad_outputs=probe, create_graph=create_graph, is_grads_batched=True
            )
        return self._reduce(vjp, probe, frobenius=frobenius)


DIVERGENCES: Registry[type[DivergenceEstimator]] = Registry(
    "divergence estimator", {"exact": ExactDivergence, "hutchinson": HutchinsonDivergence}
)
PROBES: Registry[str] = Registry("probe", {"gaussian": "gaussian", "rademacher": "rademacher"})


def build_divergence(
    name: str,
    *,
    probe: ProbeKind = "gaussian",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    per_probe: bool = False,
) -> DivergenceEstimator:
    """Registry lookup: ``"exact"`` or ``"hutchinson"`` (with its probe options)."""
    cls = DIVERGENCES[name]
    if cls is ExactDivergence:
        return ExactDivergence()
    return cls(PROBES[probe], num_probes=num_probes, generator=generator, per_probe=per_probe)


@dataclass(frozen=True)
class DivergenceConfig:
    """Which trace estimator a solve uses: a named choice with its options.

    Attributes:
        name: ``exact`` | ``hutchinson`` | ``auto`` (exact when the dimension
            is at most ``exact_max_dim``, else Hutchinson).
        probe: Hutchinson probe, ``gaussian`` or ``rademacher``.
        num_probes: Probes averaged per solve (one batched VJP).
        exact_max_dim: Largest dimension for which ``auto`` takes the exact trace.
    """

    name: str = "exact"
    probe: str = "gaussian"
    num_probes: int = 1
    exact_max_dim: int = 16

    def __post_init__(self) -> None:
        if self.name != "auto":
            DIVERGENCES.check(self.name, key="name")
        PROBES.check(self.probe, key="probe")
        if self.num_probes < 1:
            raise ValueError(f"num_probes: must be >= 1, got {self.num_probes}")
        if self.exact_max_dim < 0:
            raise ValueError(f"exact_max_dim: must be >= 0, got {self.exact_max_dim}")

    def resolve(self, dim: int) -> str:
        """The estimator ``auto`` stands for at dimension ``dim`` (other names: themselves)."""
        if self.name == "auto":
            return "exact" if dim <= self.exact_max_dim else "hutchinson"
        return self.name

    def build(
        self, dim: int, *, generator: torch.Generator | None = None, per_probe: bool = False
    ) -> DivergenceEstimator:
        """The estimator for states of dimension ``dim`` (``per_probe``: keep the K estimates apart)."""
        return build_divergence(
            self.resolve(dim),
            probe=self.probe,
            num_probes=self.num_probes,
            generator=generator,
            per_probe=per_probe,
        )

    def describe(self) -> dict[str, object]:
        d: dict[str, object] = {"name": self.name}
        if self.name != "exact":
            d.update(probe=self.probe, num_probes=self.num_probes)
        if self.name == "auto":
            d["exact_max_dim"] = self.exact_max_dim
        return d
