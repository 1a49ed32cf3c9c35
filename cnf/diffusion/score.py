"""Denoising score matching with time weightings, and the NELBO of the SDE model.

Data at t = 0, noise at t = 1 (docs/methods.md §1, §4). With the kernel
``x_t = m(t) x_0 + σ(t) z`` the conditional score is ``∇log p_{0t}(x_t|x_0) = −z/σ``,
and every loss here is a Monte-Carlo estimate of the **time integral**

    J_λ(θ) = ½ ∫_ε^1 λ(t) E_{x_0, z} ‖s_θ(x_t, t) + z/σ(t)‖² dt         (nats)

per sample, for three weightings (:data:`WEIGHTINGS`):

* ``variance``      λ = σ²  (Song et al. 2021, Ho et al. 2020), t ~ U[ε, 1];
* ``likelihood``    λ = g²  (Song et al. 2021a), t ~ U[ε, 1]. Unbiased, but the
  weight ``(1 − ε) g²/σ² ~ 1/t`` multiplies a term that tends to ``D/2``, so
  the *value* of the loss has variance ~ 1/ε. Its gradient's variance grows
  only like log(1/ε), and ``nelbo(importance=False)`` integrates that term
  exactly, so neither has the problem;
* ``likelihood_is`` λ = g², t ~ q(t) ∝ g²/σ² with the weight ``g²/q = Z σ²``
  folded in, so the per-sample loss is ``½ Z ‖σ s_θ + z‖²`` — the same
  unbiased objective as ``likelihood`` with far lower variance.

**The NELBO** (:func:`nelbo`). The SDE model is: ``x_1 ~ π``, the reverse SDE
``dx = [f x − g² s_θ] dt + g dw̄`` from 1 down to ε, then a Gaussian decoder
``x_0 | x_ε ~ N(x_ε/m_ε, (σ_ε/m_ε)² I)`` for the last stretch ``[0, ε]``.
The forward process conditioned on ``x_0`` is a variational posterior over
paths; Girsanov's theorem for the two reverse-time processes (same diffusion,
drifts differing by ``g²(s_θ − ∇log p_{0t})``) gives, for every ``x_0``,

    −log p_θ(x_0) ≤ KL(p_{01}(·|x_0) ‖ π)                                  prior term
                  + ½ ∫_ε^1 g² E‖s_θ(x_t,t) − ∇log p_{0t}(x_t|x_0)‖² dt     = J_{g²}
                  + (D/2) log(2πe σ_ε²/m_ε²)                               decoder term C

(Song et al. 2021a, Thm. 1 and eq. (9) restricted to ``[ε, 1]``; Kingma et
al. 2021 for the decoder/reconstruction term; Huang et al. 2021 for the path
ELBO). Both non-score terms are closed forms for linear SDEs: the prior KL
``½ Σ_i [σ_1²/s_π² + m_1² x_{0,i}²/s_π² − 1 − log(σ_1²/s_π²)]`` and C. Using
``d log σ²/dt = 2f + g²/σ²`` this equals Song et al.'s
``−E log π(x_1) + J_{g²} − ½∫_ε^1 E[g²‖∇log p_{0t}‖² + 2∇·f] dt``, up to the
decoder's ``−D log m_ε`` (≈ 5e-7·D nats for VP, 0 for VE). It is a true upper
bound on ``−log p`` of that SDE model, in nats per sample.

**Variance reduction of the NELBO estimate.** ``J_{g²}`` diverges like
``(D/2) log(1/ε)`` because of the ``‖z‖²/σ²`` part, which carries no
information about θ; the estimator subtracts the zero-mean control variate
``½ w c(t) (‖z‖² − D)`` (``w`` the importance weight, ``c(t) = (m²/(m² + σ²))²``:
the exact coefficient for unit-variance Gaussian data; it removes the
dominant noise at small t, e.g. a 3× smaller standard deviation on
8gaussians) and stratifies the uniforms of the importance sampler over the
time samples of each point. Neither changes the expectation. The noise that
remains comes from intermediate t, where ``x_0`` given ``x_t`` is genuinely
uncertain (about 8 nats per (t, z) draw on 8gaussians).

References:
    Vincent, "A connection between score matching and denoising autoencoders", 2011.
    Song et al., "Score-based generative modeling through SDEs", ICLR 2021.
    Song, Durkan, Murray & Ermon, "Maximum likelihood training of score-based
    diffusion models", NeurIPS 2021, arXiv:2101.09258 (2021a).
    Huang, Lim & Courville, "A variational perspective on diffusion-based
    generative models and score matching", NeurIPS 2021.
    Kingma, Salimans, Poole & Ho, "Variational diffusion models", NeurIPS 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from cnf.diffusion.sde import LinearSDE, expand_as
from cnf.registry import Registry

__all__ = [
    "WEIGHTINGS",
    "ScoreFn",
    "cv_integral",
    "decoder_constant",
    "dsm_loss",
    "nelbo",
    "prior_kl",
    "sample_time",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""A score function ``(t, x) -> s``, ``t`` of shape ``(B,)``, ``x`` and ``s`` ``(B, *event)``."""

WEIGHTINGS: Registry[str] = Registry(
    "score-matching weighting",
    {"variance": "λ = σ²", "likelihood": "λ = g²", "likelihood_is": "λ = g², t ~ g²/σ²"},
)


def _flat_sq(v: Tensor) -> Tensor:
    return v.pow(2).reshape(v.shape[0], -1).sum(1)


def sample_time(
    sde: LinearSDE,
    n: int,
    *,
    weighting: str,
    eps: float | None = None,
    u: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Times and weights such that ``E[w(t)·h(t)] = ∫_ε^1 λ(t)/σ(t)² h(t) dt``.

    With ``h(t) = ½ E‖σ s_θ + z‖²`` this gives :math:`J_λ` of the module
    docstring for every weighting.

    Args:
        sde: The forward SDE.
        n: Number of times.
        weighting: One of :data:`WEIGHTINGS`.
        eps: Lower end of the time interval (default ``sde.eps``).
        u: Optional uniforms ``(n,)`` in [0, 1] (e.g. stratified).

    Returns:
        ``(t, w)``, both of shape ``(n,)``.
    """
    WEIGHTINGS.check(weighting)
    eps = sde.eps if eps is None else eps
    dtype = dtype or torch.get_default_dtype()
    if weighting == "likelihood_is":
        t = sde.sample_importance_time(
            n, eps=eps, u=u, generator=generator, dtype=dtype, device=device
        )
        w = torch.full_like(t, sde.importance_normalizer(eps))
        return t, w
    if u is None:
        u = torch.rand(n, generator=generator, dtype=dtype, device=device)
    t = eps + (sde.T - eps) * u.to(dtype)
    if weighting == "variance":
        return t, torch.full_like(t, sde.T - eps)
    _, s = sde.marginal(t)
    return t, (sde.T - eps) * sde.g2(t) / s.pow(2)


def dsm_loss(
    score_fn: ScoreFn,
    sde: LinearSDE,
    x0: Tensor,
    *,
    weighting: str = "likelihood_is",
    eps: float | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Weighted denoising score matching, one time and one noise draw per sample.

    Returns ``½ w(t) ‖σ(t) s_θ(x_t, t) + z‖²`` per sample, an unbiased estimate of
    ``J_λ = ½ ∫_ε^1 λ E‖s_θ − ∇log p_{0t}‖² dt`` in nats (module docstring). For
    ``likelihood`` and ``likelihood_is`` this is exactly the score-matching term
    of :func:`nelbo`.

    Args:
        score_fn: ``(t, x) -> s`` with ``t`` ``(B,)``.
        sde: The forward SDE.
        x0: Data ``(B, *event)``.
        weighting: One of :data:`WEIGHTINGS`.
        t: Optional fixed times ``(B,)`` (then ``w`` follows from the weighting's
            density; for ``likelihood_is`` they must be draws from ``q``).
        noise: Optional fixed standard-normal noise ``(B, *event)``.

    Returns:
        Per-sample loss ``(B,)``.
    """
    b = x0.shape[0]
    if t is None:
        t, w = sample_time(
            sde,
            b,
            weighting=weighting,
            eps=eps,
            generator=generator,
            dtype=x0.dtype,
            device=x0.device,
        )
    else:
        w = _weight_at(sde, t, weighting, eps)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    xt = sde.perturb(t, x0, noise)
    _, s = sde.marginal(t)
    residual = expand_as(s, x0) * score_fn(t, xt) + noise
    return 0.5 * w * _flat_sq(residual)


def _weight_at(sde: LinearSDE, t: Tensor, weighting: str, eps: float | None) -> Tensor:
    eps = sde.eps if eps is None else eps
    if weighting == "variance":
        return torch.full_like(t, sde.T - eps)
    if weighting == "likelihood":
        _, s = sde.marginal(t)
        return (sde.T - eps) * sde.g2(t) / s.pow(2)
    if weighting == "likelihood_is":
        return torch.full_like(t, sde.importance_normalizer(eps))
    WEIGHTINGS.check(weighting)
    raise AssertionError(weighting)  # pragma: no cover - every registered weighting is handled


def prior_kl(sde: LinearSDE, x0: Tensor) -> Tensor:
    """``KL(p_{01}(x_1 | x_0) ‖ π)`` per sample in nats, shape ``(B,)`` (closed form)."""
    one = torch.ones((), dtype=x0.dtype, device=x0.device)
    m1, s1 = sde.marginal(one)
    d = x0[0].numel()
    var_ratio = s1.pow(2) / sde.prior_std**2
    return 0.5 * (
        d * (var_ratio - 1 - torch.log(var_ratio)) + m1.pow(2) * _flat_sq(x0) / sde.prior_std**2
    )


def decoder_constant(sde: LinearSDE, dim: int, *, eps: float | None = None) -> float:
    """``E[−log N(x_0; x_ε/m_ε, (σ_ε/m_ε)² I)] = (D/2) log(2πe σ_ε²/m_ε²)`` over ``x_ε | x_0``."""
    eps = sde.eps if eps is None else eps
    m, s = sde.marginal(torch.tensor(eps, dtype=torch.float64))
    return 0.5 * dim * (math.log(2 * math.pi * math.e) + 2 * float(torch.log(s / m)))


def _cv_coefficient(sde: LinearSDE, t: Tensor) -> Tensor:
    """``c(t) = (m²/(m² + σ²))²``: the control variate's coefficient, 1 at t = 0."""
    m, s = sde.marginal(t)
    return (m.pow(2) / (m.pow(2) + s.pow(2))).pow(2)


def cv_integral(sde: LinearSDE, *, eps: float | None = None, num_nodes: int = 128) -> float:
    """``∫_ε^1 c(t) g(t)²/σ(t)² dt`` with ``c = (m²/(m² + σ²))²``, in float64.

    The integrand ~ ``1/t`` near 0, but in the variable ``u = (Φ(t) − Φ(ε))/Z``
    of the importance density (``dΦ = g²/σ² dt``, ``Z = Φ(1) − Φ(ε)``) it is
    ``Z c(t(u))`` with ``0 < c <= 1`` smooth, so Gauss-Legendre quadrature in u
    is accurate to about machine precision. For VP (``c = m⁴``) the closed form
    is ``[−u − log(1 − u)]`` between ``u = e^{−B(1)}`` and ``e^{−B(ε)}``.
    """
    eps = sde.eps if eps is None else eps
    nodes, weights = np.polynomial.legendre.leggauss(num_nodes)
    u = torch.as_tensor((nodes + 1) / 2, dtype=torch.float64)
    t = sde.sample_importance_time(num_nodes, eps=eps, u=u, dtype=torch.float64)
    c = _cv_coefficient(sde, t)
    return sde.importance_normalizer(eps) * float((c * torch.as_tensor(weights / 2)).sum())


def nelbo(
    score_fn: ScoreFn,
    sde: LinearSDE,
    x0: Tensor,
    *,
    num_t: int = 8,
    importance: bool = True,
    control_variate: bool = True,
    eps: float | None = None,
    generator: torch.Generator | None = None,
    chunk: int = 0,
) -> Tensor:
    """Unbiased estimate of the NELBO of the SDE model per sample, in nats.

    ``NELBO(x_0) = KL(p_{01}(·|x_0) ‖ π) + J_{g²}(x_0) + (D/2) log(2πe σ_ε²/m_ε²)``
    (module docstring), an upper bound on ``−log p_θ(x_0)`` of the reverse-SDE
    model with a Gaussian decoder on ``[0, ε]``. The two outer terms are exact;
    ``J_{g²}`` is averaged over ``num_t`` (time, noise) draws per point.

    Args:
        score_fn: ``(t, x) -> s``.
        sde: The forward SDE.
        x0: Data ``(B, *event)``.
        num_t: Time samples per data point.
        importance: Draw t from ``q ∝ g²/σ²`` (stratified over the ``num_t``
            draws). ``False``: t uniform on ``[ε, 1]`` (stratified), weight
            ``(1 − ε) g²/σ²``, with the term ``½ w c(t) ‖z‖²`` replaced by its
            exact integral ``(D/2) ∫_ε^1 c g²/σ² dt`` (:func:`cv_integral`); see
            "Uniform t" below. A cross-check of the importance-sampled estimate
            (same expectation), with a larger variance.
        control_variate: Subtract the zero-mean ``½ w c(t)(‖z‖² − D)``
            (importance sampling). Uniform t always uses its exact version and
            refuses ``False``.
        chunk: Evaluate the score on at most this many points at once (0: all).

    Returns:
        ``(B,)`` estimates.

    Raises:
        ValueError: ``importance=False`` with ``control_variate=False``.

    **Uniform t.** Uniform draws with the exact weight ``(1 − ε) g²/σ²`` are
    unbiased, but the weight grows like ``1/t`` (VP: ``σ² ≈ β_min t``,
    ``g² ≈ β_min``) while the integrand ``½ ‖σ s_θ + z‖²`` tends to
    ``½ ‖z‖²``, of mean ``D/2``, as t -> 0 for any bounded score: the
    second moment ``∫_ε (D/2)² (g²/σ²)² dt`` grows like ``(D/2)²/ε``
    (1e5 for D = 2, ε = 1e-5). The estimate is dominated by rare draws near
    ε; on 2000 points of 2-D Gaussian data with the exact score (VP, 8 time
    samples) its mean ranged over 0.09-7.39 nats across 8 seeds, against
    2.79-2.91 with importance sampling. Subtracting ``½ w c ‖z‖²`` and adding its
    exact integral leaves ``½ w [σ²‖s_θ‖² + 2σ s_θ·z + (1 − c)‖z‖²]``
    (``1 − c = O(σ²)``), whose second moment grows only like
    ``E‖s_θ‖² log(1/ε)``: finite for every ε and moderate when the score is
    moderate. Importance sampling has a bounded integrand and stays the default.
    """
    if num_t < 1:
        raise ValueError(f"num_t must be >= 1, got {num_t}")
    if not importance and not control_variate:
        raise ValueError(
            "nelbo(importance=False) needs control_variate=True: with uniform t and no "
            "control variate the estimator's variance grows like 1/eps (a weight ~1/t "
            "on a term that does not vanish at t = 0)"
        )
    b, d = x0.shape[0], x0[0].numel()
    eps = sde.eps if eps is None else eps
    kw = {"dtype": x0.dtype, "device": x0.device}
    # Stratified uniforms: draw k lands in [k/K, (k+1)/K); a random shift per point.
    u = torch.arange(num_t, **kw).reshape(-1, 1) + torch.rand((num_t, b), generator=generator, **kw)
    u = (u / num_t).reshape(-1)
    weighting = "likelihood_is" if importance else "likelihood"
    t, w = sample_time(sde, num_t * b, weighting=weighting, eps=eps, u=u, **kw)
    xs = x0.repeat(num_t, *([1] * (x0.dim() - 1)))
    z = torch.randn(xs.shape, generator=generator, **kw)
    per = torch.empty(num_t * b, **kw)
    step = chunk if chunk > 0 else num_t * b
    for i in range(0, num_t * b, step):
        sl = slice(i, i + step)
        per[sl] = dsm_loss(
            score_fn, sde, xs[sl], weighting=weighting, eps=eps, t=t[sl], noise=z[sl]
        )
    if importance and control_variate:
        per = per - 0.5 * w * _cv_coefficient(sde, t) * (_flat_sq(z) - d)
    elif not importance:
        # Uniform t: the weight w ~ 1/t makes the known part ½ w c ‖z‖² (mean
        # ½ w c D, with c -> 1 as t -> 0) an estimate of a log-divergent integral
        # with variance ~ 1/ε. Subtract it and add its exact integral instead.
        per = per - 0.5 * w * _cv_coefficient(sde, t) * _flat_sq(z)
        per = per + 0.5 * d * cv_integral(sde, eps=eps)
    score_term = per.reshape(-1, b).mean(0)
    return prior_kl(sde, x0) + score_term + decoder_constant(sde, d, eps=eps)
