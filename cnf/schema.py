"""Every configuration schema of the project, in one place.

Run configs (``configs/<family>/*.yaml``), sweep files (``configs/sweeps``)
and table specs (``configs/tables``) are OmegaConf *structured* configs of
the dataclasses below: unknown keys and wrong types are errors before
anything runs, and builders receive typed objects
(``OmegaConf.to_object``), never string-keyed dicts.

**Named choices** follow one convention: a nested section ``{name: ...,
options...}`` whose ``name`` is looked up in the choice's registry. Choices
whose options are the same for every name have one schema here
(:class:`SolverSchema`, :class:`DivergenceSchema`, ...). Choices whose
options differ per name (flows, networks, SDEs, DiffFlow's ``g(t)``) are
marked with ``choice(...)``: their schema is derived from the keyword
arguments of the registered builder, so the builder's signature is the one
place its options are declared (:func:`options_schema`). Changing a choice's
``name`` from the command line starts its section afresh from the new
choice's defaults.

Validation: every dataclass checks itself in ``__post_init__`` and raises
``ValueError("field: message")``; :mod:`cnf.config` prefixes the dotted path.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

MISSING_STR = "???"  # OmegaConf's marker of a required value

__all__ = [
    "CHOICES",
    "Config",
    "DataSchema",
    "DivergenceSchema",
    "EvalSchema",
    "FIDSchema",
    "PreprocessSchema",
    "SolverSchema",
    "TrackSchema",
    "TrainSchema",
    "choice",
    "options_schema",
]


def _positive(**values: float) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ValueError(f"{key}: must be > 0, got {value}")


def _non_negative(**values: float) -> None:
    for key, value in values.items():
        if value < 0:
            raise ValueError(f"{key}: must be >= 0, got {value}")


def _non_empty(**values: tuple[Any, str]) -> None:
    """``key=(value, what it must be)``: raise when a required value is empty."""
    for key, (value, what) in values.items():
        if not value:
            raise ValueError(f"{key}: {what}")


def _widths(key: str, widths: Sequence[int]) -> None:
    if not widths or any(h < 1 for h in widths):
        raise ValueError(f"{key}: needs one or more positive widths, got {list(widths)}")


def _registry(name: str) -> Any:
    """The registry of a named choice (imported lazily: the schemas load without torch models)."""
    from cnf import choices

    return getattr(choices, name)


def _check(registry: str, key: str, value: str) -> None:
    _registry(registry).check(value, key=key)


# ----------------------------------------------------------------- named choices
def choice(registry: str, default: str, **options: Any) -> Any:
    """A ``{name: ..., options}`` field whose schema follows its ``name`` (see module docstring).

    Args:
        registry: Attribute of :mod:`cnf.choices` holding the builders.
        default: The default name.
        options: Default options that differ from the builder's defaults.
    """
    value = {"name": default, **options}
    return field(default_factory=lambda: dict(value), metadata={"choice": registry})


CHOICES = "choice"  # the dataclass-field metadata key marking a named-choice field


def _config_type(hint: Any) -> Any:
    """A type OmegaConf accepts for a builder's annotated option."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return typing.Optional[_config_type(args[0])] if len(args) == 1 else Any  # noqa: UP045
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        args = typing.get_args(hint)
        item = args[0] if args and args[0] is not Ellipsis else Any
        return list[item] if item in (int, float, str, bool) else list[Any]
    if hint in (int, float, str, bool) or dataclasses.is_dataclass(hint):
        return hint
    return Any


@functools.cache
def options_schema(owner: str, name: str, builder: Callable[..., Any]) -> type:
    """A structured-config dataclass ``{name, **keyword options of builder}``.

    Positional parameters (shapes, grids) are supplied by the code and are
    not options; keyword-only parameters are. Each option keeps the
    builder's annotation and default.
    """
    overrides = getattr(builder, "option_defaults", {})  # a preset's own defaults
    builder = inspect.unwrap(builder)  # a wrapper declares its wrapped builder's options
    target = builder.__init__ if inspect.isclass(builder) else builder
    hints = typing.get_type_hints(target)
    fields: list[tuple[str, Any, Any]] = [("name", str, field(default=name))]
    for p in inspect.signature(target).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(
                f"{owner} '{name}': option '{p.name}' needs a default to be configurable"
            )
        typ = _config_type(hints.get(p.name, Any))
        default = overrides.get(p.name, p.default)
        if dataclasses.is_dataclass(typ) and default is None:
            fields.append((p.name, typ, field(default_factory=typ)))
        elif isinstance(default, list | tuple | dict) or dataclasses.is_dataclass(default):
            fields.append((p.name, typ, field(default_factory=lambda d=default: _copy(d))))
        else:
            fields.append((p.name, typ, field(default=default)))
    cls_name = "".join(w.capitalize() for w in f"{owner}_{name}".split("_")) + "Options"
    return dataclasses.make_dataclass(cls_name, fields)


def _copy(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return list(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value)
    return dict(value)


def builder_options(section: Any) -> dict[str, Any]:
    """The keyword options of a resolved choice section (everything but ``name``)."""
    return {
        f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name != "name"
    }


# --------------------------------------------------------------- shared sections
@dataclass
class SolverSchema:
    """ODE solver: ``{name: <torchdiffeq method>, rtol, atol | steps, adjoint, ...}``."""

    name: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    steps: int = 0  # fixed-step methods: steps over the interval
    adjoint: bool = False
    seminorm: bool = False
    max_steps: int = 0  # adaptive methods: cap on the steps (0: torchdiffeq's)

    def __post_init__(self) -> None:
        self.build()  # SolverConfig validates the method and its steps or tolerances

    def build(self) -> Any:
        from cnf.solve import SolverConfig

        return SolverConfig(**dataclasses.asdict(self))


@dataclass
class DivergenceSchema:
    """Trace estimator: ``{name: exact | hutchinson | auto, probe, num_probes, exact_max_dim}``."""

    name: str = "exact"
    probe: str = "gaussian"
    num_probes: int = 1
    exact_max_dim: int = 16  # auto: exact trace up to this dimension

    def __post_init__(self) -> None:
        self.build()  # DivergenceConfig validates the name, the probe and the counts

    def build(self) -> Any:
        from cnf.divergence import DivergenceConfig

        return DivergenceConfig(**dataclasses.asdict(self))


@dataclass
class PreprocessSchema:
    """The data bijection ``y = scale · logit_α(x) + shift`` every family applies first."""

    logit_alpha: float = 0.0  # > 0: logit(α + (1 − 2α) x) first, for data in [0, 1]
    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.logit_alpha < 0.5:
            raise ValueError(f"logit_alpha: must be in [0, 0.5) (0 = off), got {self.logit_alpha}")
        if self.scale == 0:
            raise ValueError("scale: must be non-zero")

    def build(self) -> Any:
        from cnf.flows.preprocess import Preprocess

        return Preprocess(logit_alpha=self.logit_alpha, scale=self.scale, shift=self.shift)


@dataclass
class EvalLogDetSchema:
    """Residual flows at evaluation: ``auto`` = exact up to ``exact_max_dim``, else a series."""

    name: str = "auto"  # auto | exact | series | own (the training estimator)
    exact_max_dim: int = 16
    series_terms: int = 50

    def __post_init__(self) -> None:
        if self.name not in ("auto", "exact", "series", "own"):
            raise ValueError(f"name: unknown value '{self.name}'; valid: auto, exact, own, series")
        _non_negative(exact_max_dim=self.exact_max_dim)
        _positive(series_terms=self.series_terms)


# -------------------------------------------------------------------- families
@dataclass
class FFJORDSchema:
    """``model:`` for ``family: ffjord`` (FFJORD, + RNODE with kinetic/jacobian > 0).

    ``architecture``: ``mlp`` (vectors), ``conv`` (one scale of conv CNF blocks
    on ``(C, H, W)`` images) or ``multiscale`` (FFJORD's ODENVP: ``num_blocks``
    blocks before and after each squeeze, ``num_scales`` scales, 0 = as many as
    H and W allow). ``hidden_dims`` are widths (mlp) or channels (conv layers).
    ``regularizer_norm``: ``sum`` weighs ``∫‖f‖²`` and ``∫‖εᵀ∂f/∂z‖²`` as
    written; ``per_dim`` is the objective of RNODE's released code (see
    :mod:`cnf.models.ffjord`). ``loss_unit``: the training objective in
    ``nats`` per sample or ``bits_per_dim`` (divided by ``D ln 2``, as the
    FFJORD/RNODE image scripts train; it matters for the adjoint's tolerances).
    """

    family: str = "ffjord"
    architecture: str = "mlp"
    hidden_dims: list[int] = field(default_factory=lambda: [64, 64, 64])
    layer: str = "concatsquash"
    activation: str = "tanh"
    zero_init: bool = True
    num_blocks: int = 1
    num_scales: int = 0  # multiscale only; 0 = FFJORD's count from H and W
    batch_norm: bool = False
    time_length: float = 1.0
    learn_time: bool = False
    divergence: DivergenceSchema = field(default_factory=DivergenceSchema)  # training estimator
    solver: SolverSchema = field(default_factory=lambda: SolverSchema(name="rk4", steps=8))
    kinetic: float = 0.0  # RNODE weight of ∫‖f‖² dt
    jacobian: float = 0.0  # RNODE weight of ∫‖∂f/∂z‖_F² dt
    regularizer_norm: str = "sum"  # sum | per_dim (RNODE's released code)
    loss_unit: str = "nats"  # nats | bits_per_dim (training objective; FFJORD/RNODE image scripts)
    preprocess: PreprocessSchema = field(default_factory=PreprocessSchema)
    compile: bool = False  # mlp + exact trace: the fused trace pass through torch.compile

    def __post_init__(self) -> None:
        _check("FFJORD_ARCHITECTURES", "architecture", self.architecture)
        images = self.architecture != "mlp"
        _check("CONV_LAYERS" if images else "LAYERS", "layer", self.layer)
        _check("ACTIVATIONS", "activation", self.activation)
        _check("REGULARIZER_NORMS", "regularizer_norm", self.regularizer_norm)
        _check("LOSS_UNITS", "loss_unit", self.loss_unit)
        _widths("hidden_dims", self.hidden_dims)
        if self.divergence.name == "auto":
            raise ValueError("divergence.name: training needs exact or hutchinson")
        _positive(num_blocks=self.num_blocks, time_length=self.time_length)
        _non_negative(kinetic=self.kinetic, jacobian=self.jacobian, num_scales=self.num_scales)
        if self.num_scales and self.architecture != "multiscale":
            raise ValueError(
                f"num_scales: only for architecture=multiscale, got architecture={self.architecture}"
            )
        if self.batch_norm and images:
            raise ValueError(
                f"batch_norm: moving batch norm is for vectors; architecture={self.architecture} "
                "needs batch_norm=false"
            )
        if self.compile:
            from cnf.fused_trace import FUSED_ACTIVATIONS, FUSED_LAYERS

            if images or self.divergence.name != "exact":
                raise ValueError(
                    "compile: compiles the exact trace of mlp fields; needs architecture=mlp and "
                    f"divergence.name=exact, got architecture={self.architecture}, "
                    f"divergence.name={self.divergence.name}"
                )
            if self.layer not in FUSED_LAYERS or self.activation not in FUSED_ACTIVATIONS:
                raise ValueError(
                    f"compile: needs layer among {', '.join(FUSED_LAYERS)} and activation among "
                    f"{', '.join(FUSED_ACTIVATIONS)}, got layer={self.layer}, activation={self.activation}"
                )


@dataclass
class PairingSchema:
    """Flow-matching coupling: ``rectified`` (independent) or ``ot`` (minibatch OT)."""

    name: str = "rectified"
    ot_solver: str = "emd"  # ot: emd (POT network simplex) | assignment (scipy)

    def __post_init__(self) -> None:
        _check("PAIRINGS", "name", self.name)
        _check("OT_SOLVERS", "ot_solver", self.ot_solver)


@dataclass
class FlowMatchingSchema:
    """``model:`` for ``family: fm`` (rectified flow, OT-CFM, reflow)."""

    family: str = "fm"
    pairing: PairingSchema = field(default_factory=PairingSchema)
    sigma: float = 0.0  # path noise σ: x_t = (1−t)x0 + t x1 + σ ε
    hidden_dims: list[int] = field(default_factory=lambda: [64, 64, 64])
    layer: str = "concat"
    activation: str = "selu"
    zero_init: bool = False
    preprocess: PreprocessSchema = field(default_factory=PreprocessSchema)
    net: Any = choice("FM_NETS", "mlp")  # mlp: the keys above; or an image backbone (ddpm, ...)
    reflow_pairs: str | None = None  # train on (x0, x1) pairs from experiments/reflow.py
    init_from: str | None = None  # run folder or checkpoint whose weights start training
    # Maximum-likelihood fine-tuning: the last ml_fraction of the planned iterations
    # train on −log p(x) by backprop through the CNF solve ml_solver with the trace
    # ml_divergence, instead of the CFM loss (a flow-matching warm start); the
    # learning-rate schedule starts afresh there, scaled by ml_lr_scale.
    ml_fraction: float = 0.0
    ml_lr_scale: float = 1.0
    ml_solver: SolverSchema = field(default_factory=lambda: SolverSchema(name="rk4", steps=6))
    ml_divergence: DivergenceSchema = field(default_factory=DivergenceSchema)

    def __post_init__(self) -> None:
        _check("LAYERS", "layer", self.layer)
        _check("ACTIVATIONS", "activation", self.activation)
        _widths("hidden_dims", self.hidden_dims)
        _non_negative(sigma=self.sigma)
        if not 0 <= self.ml_fraction < 1:
            raise ValueError(f"ml_fraction: must be in [0, 1), got {self.ml_fraction}")
        _positive(ml_lr_scale=self.ml_lr_scale)
        if self.ml_divergence.name == "auto":
            raise ValueError("ml_divergence.name: training needs exact or hutchinson")
        from pathlib import Path

        for key in ("reflow_pairs", "init_from"):
            value = getattr(self, key)
            if value and not Path(value).exists():
                raise ValueError(f"{key}: {value} does not exist")


@dataclass
class SamplerSchema:
    """Default sampler of a score model: ``{name: ode | em | pc | sdeint | euler | heun, steps, ...}``."""

    name: str = "ode"
    steps: int = 500  # em / pc / sdeint / euler / heun steps
    snr: float = 0.16  # pc: Langevin signal-to-noise ratio
    corrector_steps: int = 1  # pc: Langevin steps per time step
    sde_method: str = "euler"  # sdeint: torchsde method
    grid: str = "karras"  # euler / heun: karras (EDM, rho = 7) | uniform
    # karras: noise-level range (EDM's), clamped to the SDE's; starts at x = sigma_max z
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self) -> None:
        _check("SCORE_SAMPLERS", "name", self.name)
        _check("TIME_GRIDS", "grid", self.grid)
        _check("SDE_METHODS", "sde_method", self.sde_method)
        _positive(steps=self.steps, snr=self.snr, sigma_min=self.sigma_min)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(
                f"sigma_max: must exceed sigma_min ({self.sigma_min}), got {self.sigma_max}"
            )
        _non_negative(corrector_steps=self.corrector_steps)


@dataclass
class ScoreSchema:
    """``model:`` for ``family: score`` (VP / sub-VP / VE score SDEs)."""

    family: str = "score"
    sde: Any = choice("SDES", "vp")
    weighting: str = "likelihood_is"  # variance | likelihood | likelihood_is
    parameterization: str = "noise"  # score | noise | data
    conditioning: str = "log_sigma"  # the network's noise-level input: log_sigma | time
    net: Any = choice("SCORE_NETS", "mlp")
    preprocess: PreprocessSchema = field(default_factory=PreprocessSchema)
    nll_correction: str = "truncate"  # [0, ε]: truncate | perturb
    nelbo_samples: int = 8  # time samples per test point of the NELBO; 0 = no NELBO
    # NELBO with t ~ g²/σ² (else uniform t with the small-t term integrated
    # exactly: a cross-check, same expectation; see cnf.diffusion.score.nelbo)
    nelbo_importance: bool = True
    sampler: SamplerSchema = field(default_factory=SamplerSchema)

    def __post_init__(self) -> None:
        _check("WEIGHTINGS", "weighting", self.weighting)
        _check("PARAMETERIZATIONS", "parameterization", self.parameterization)
        _check("CONDITIONINGS", "conditioning", self.conditioning)
        _check("CORRECTIONS", "nll_correction", self.nll_correction)
        _non_negative(nelbo_samples=self.nelbo_samples)


@dataclass
class INDMSchema(ScoreSchema):
    """``model:`` for ``family: indm``: the score model's keys plus the flow's."""

    family: str = "indm"
    flow: Any = choice("FLOWS_OR_IDENTITY", "resflow")
    flow_lr_scale: float = 1.0  # flow learning rate = flow_lr_scale × train.lr
    temperature: float = 1.0  # sampling: z_1 ~ N(0, (τ·prior_std)² I)
    eval_logdet: EvalLogDetSchema = field(default_factory=EvalLogDetSchema)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weighting not in ("likelihood", "likelihood_is"):
            raise ValueError(
                f"weighting: INDM trains on the NELBO, so it needs likelihood or "
                f"likelihood_is, got '{self.weighting}'"
            )
        _positive(flow_lr_scale=self.flow_lr_scale, temperature=self.temperature)


@dataclass
class TimeGridSchema:
    """DiffFlow's time grids: see :class:`cnf.diffflow.schedules.TimeGrid`."""

    name: str = "power"  # uniform | power
    t_start: float = 1e-3
    t_end: float = 0.05
    power: float = 0.9
    random: bool = True  # stratified random grid per training iteration (eval: fixed grid)

    def __post_init__(self) -> None:
        _check("GRIDS", "name", self.name)


@dataclass
class DiffFlowSchema:
    """``model:`` for ``family: diffflow``.

    ``progressive_steps``/``progressive_iters``: train with
    ``progressive_steps[k]`` steps up to iteration ``progressive_iters[k]``,
    then with ``steps`` (also the evaluation/sampling default).
    ``drift_lr``/``score_lr``: per-network learning rates (null: ``train.lr``).
    """

    family: str = "diffflow"
    steps: int = 30
    progressive_steps: list[int] = field(default_factory=list)
    progressive_iters: list[int] = field(default_factory=list)
    grid: TimeGridSchema = field(default_factory=TimeGridSchema)
    diffusion: Any = choice("DIFFUSIONS", "constant")
    base_drift: str = "zero"  # zero | vp (f = −½ g(t)² x)
    freeze_drift: bool = False  # no learned drift: fixed-drift diffusion with f = f_base
    prior_std: float = 1.0
    preprocess: PreprocessSchema = field(default_factory=PreprocessSchema)
    normalizing_terms: bool = True  # D·Σ log(g_{i+1}/g_i); false = the released code's value
    backprop: str = "autograd"  # autograd | checkpointed
    sampler: str = "sde"  # default sampler: sde | ode
    drift_net: Any = choice("DIFFFLOW_NETS", "mlp")
    score_net: Any = choice("DIFFFLOW_NETS", "mlp")
    drift_lr: float | None = None
    score_lr: float | None = None

    def __post_init__(self) -> None:
        _check("BASE_DRIFTS", "base_drift", self.base_drift)
        _check("BACKPROP_MODES", "backprop", self.backprop)
        _check("DIFFFLOW_SAMPLERS", "sampler", self.sampler)
        _positive(steps=self.steps, prior_std=self.prior_std)
        steps, iters = list(self.progressive_steps), list(self.progressive_iters)
        if len(steps) != len(iters):
            raise ValueError("progressive_steps: needs the same length as progressive_iters")
        if any(s < 1 for s in steps) or any(b <= a for a, b in zip(iters, iters[1:])):
            raise ValueError("progressive_iters: must increase, and progressive_steps must be >= 1")
        for key in ("drift_lr", "score_lr"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"{key}: must be > 0 (or null for train.lr), got {value}")


@dataclass
class FlowSchema:
    """``model:`` for ``family: flow`` (NICE, RealNVP, Glow, residual flows)."""

    family: str = "flow"
    flow: Any = choice("FLOWS", "realnvp")
    preprocess: PreprocessSchema = field(default_factory=PreprocessSchema)
    temperature: float = 1.0  # sampling: z ~ N(0, τ² I)
    eval_logdet: EvalLogDetSchema = field(default_factory=EvalLogDetSchema)

    def __post_init__(self) -> None:
        _positive(temperature=self.temperature)


# -------------------------------------------------------------------- run config
@dataclass
class DataSchema:
    name: str = "8gaussians"
    path: str | None = None  # file: a .npy/.csv of samples (N, D); images/tabular: the data folder
    test_size: int = 5000  # toy data: held-out samples (fixed across seeds)
    val_size: int = 1000
    flatten: bool = True  # image data: event shape (C*H*W,) for MLPs; false keeps (C, H, W)
    standardize: bool = True  # file data: standardise with training-split statistics
    hflip: bool = False  # image data: random horizontal flips of the training stream (seeded)

    def __post_init__(self) -> None:
        _check("DATASETS", "name", self.name)
        _positive(test_size=self.test_size, val_size=self.val_size)
        if self.hflip and _registry("DATASETS")[self.name].kind != "image":
            raise ValueError(f"hflip: flips images; data.name={self.name} is not an image data set")


@dataclass
class TrainSchema:
    iters: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine
    warmup_iters: int = 0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    ema: float = 0.0  # EMA decay of the evaluated weights; 0 = off
    log_every: int = 10
    ckpt_every: int = 500  # iterations between checkpoints
    ckpt_minutes: float = 10.0  # also checkpoint on this wall-clock timer; 0 = off
    val_every: int = 0  # validation NLL every N iterations; 0 = off
    # Validation: the model's evaluation settings with these flat/dotted keys changed
    # (e.g. {divergence: {name: hutchinson}}); {} = the eval: section's settings.
    val_settings: dict[str, Any] = field(default_factory=dict)
    # Plateau rule of FFJORD's train_tabular.py (cnf.train.plateau): multiply the
    # learning rate by lr_drop_factor once more validations in a row than each
    # count have not improved ([10, 20] there), stop after more than
    # early_stop_after of them (30 there; 0 = off).
    lr_drop_after: list[int] = field(default_factory=list)
    lr_drop_factor: float = 0.1
    early_stop_after: int = 0
    keep_best: bool = False  # keep the best-validation weights; the test evaluates them
    # Wall-clock budget of training seconds (0 = off): the iteration count is fixed
    # once, from the seconds per iteration of the first budget_warmup_iters
    # iterations, at most train.iters; the schedule spans that count.
    budget_seconds: float = 0.0
    budget_warmup_iters: int = 20
    # ... and at least this fraction of the budget: the first iterations of a fast
    # model run slower (allocator, caches), and a count fitted to them underspends.
    budget_warmup_fraction: float = 0.05
    # Re-fit the count this many times after the warm-up, evenly over what is left,
    # from the seconds per iteration since the last fit (0 = fixed once): the count
    # then follows iterations that slow down (an adaptive solver's NFE grows) and
    # the machine's load, at the price that a run resumed before its last re-fit
    # re-fits with its own machine's speed.
    budget_replans: int = 0

    def __post_init__(self) -> None:
        _check("OPTIMIZERS", "optimizer", self.optimizer)
        _check("SCHEDULES", "schedule", self.schedule)
        _non_negative(budget_seconds=self.budget_seconds, early_stop_after=self.early_stop_after)
        if not 0 <= self.budget_warmup_fraction < 1:
            raise ValueError(
                f"budget_warmup_fraction: must be in [0, 1), got {self.budget_warmup_fraction}"
            )
        _non_negative(budget_replans=self.budget_replans)
        if self.budget_warmup_iters < 2:
            raise ValueError(f"budget_warmup_iters: must be >= 2, got {self.budget_warmup_iters}")
        if not 0 < self.lr_drop_factor < 1:
            raise ValueError(f"lr_drop_factor: must be in (0, 1), got {self.lr_drop_factor}")
        drops = list(self.lr_drop_after)
        if any(n < 0 for n in drops) or any(b <= a for a, b in zip(drops, drops[1:])):
            raise ValueError(f"lr_drop_after: must be increasing counts >= 0, got {drops}")
        if not self.val_every:
            for key in ("lr_drop_after", "early_stop_after", "keep_best"):
                if getattr(self, key):
                    raise ValueError(f"{key}: needs validation, set train.val_every > 0")
        _positive(
            batch_size=self.batch_size,
            lr=self.lr,
            log_every=self.log_every,
            ckpt_every=self.ckpt_every,
        )
        _non_negative(
            iters=self.iters,
            grad_clip=self.grad_clip,
            ckpt_minutes=self.ckpt_minutes,
            warmup_iters=self.warmup_iters,
            val_every=self.val_every,
        )
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema: must be in [0, 1), got {self.ema}")


@dataclass
class FIDSchema:
    """Sample quality of image models in ``final.json``: FD (FID) and KID (docs/methods.md §8.5).

    ``features``: null (off), ``digits`` (the offline digits classifier) or
    the path of a TorchScript feature network such as ``inception-2015-12-05.pt``.
    """

    features: str | None = None
    num_samples: int = 50_000  # samples of the model (FID-50k; fewer on a CPU)
    batch_size: int = 0  # samples per model.sample call; 0 = eval.batch_size
    kid_subsets: int = 100
    kid_subset_size: int = 1000

    def __post_init__(self) -> None:
        if self.features is not None and not str(self.features).strip():
            raise ValueError("features: must be null, digits or the path of a TorchScript file")
        _non_negative(batch_size=self.batch_size)
        if self.num_samples < 2 or self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise ValueError(
                "num_samples: needs num_samples >= 2, kid_subsets >= 1 and kid_subset_size >= 2, "
                f"got {self.num_samples}, {self.kid_subsets}, {self.kid_subset_size}"
            )


@dataclass
class EvalSchema:
    """Evaluation settings (the only keys ``experiments/evaluate.py`` may change)."""

    solver: SolverSchema = field(default_factory=SolverSchema)  # dopri5, 1e-5
    divergence: DivergenceSchema = field(
        default_factory=lambda: DivergenceSchema(name="auto", probe="rademacher")
    )
    batch_size: int = 5000
    num_samples: int = 5000  # samples drawn for plots and sample statistics
    seed: int = 1234  # probes and base noise at evaluation: common across runs and settings
    plots: bool = True
    fid: FIDSchema = field(default_factory=FIDSchema)  # image data: FD / KID in final.json

    def __post_init__(self) -> None:
        _positive(batch_size=self.batch_size)
        _non_negative(num_samples=self.num_samples)


@dataclass
class RunSchema:
    dir: str | None = None  # default: runs/<family>_<data.name>_s<seed>


@dataclass
class TrackSchema:
    wandb: str = "offline"  # offline | online | disabled
    project: str = "cnf"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    system_metrics: bool = True  # W&B's CPU/GPU/memory sampler (a separate process)
    init_timeout: float = 30.0  # seconds for an online W&B init; then offline (one warning)

    def __post_init__(self) -> None:
        _check("WANDB_MODES", "wandb", self.wandb)
        _positive(init_timeout=self.init_timeout)


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | float64
    data: DataSchema = field(default_factory=DataSchema)
    model: Any = None
    train: TrainSchema = field(default_factory=TrainSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)
    run: RunSchema = field(default_factory=RunSchema)
    track: TrackSchema = field(default_factory=TrackSchema)

    def __post_init__(self) -> None:
        _check("DEVICES", "device", self.device.split(":")[0])
        _check("DTYPES", "dtype", self.dtype)
        if (
            self.eval.fid.features is not None
            and _registry("DATASETS")[self.data.name].kind != "image"
        ):
            raise ValueError(
                f"eval.fid.features: FD/KID need an image data set, data.name={self.data.name} "
                "is not one (set eval.fid.features=null)"
            )
        if getattr(self.model, "ml_fraction", 0) > 0 and self.train.budget_seconds > 0:
            # The count would be fitted to the cheap CFM iterations of the warm-up and
            # the maximum-likelihood ones (an ODE solve each) would overrun the budget.
            raise ValueError(
                "model.ml_fraction: not with train.budget_seconds (the budget's count is fitted "
                "to the CFM iterations' cost); set train.iters instead"
            )


# -------------------------------------------------------------------- sweeps
@dataclass
class SweepSchema:
    """A sweep file (``configs/sweeps/*.yaml``; format in :mod:`cnf.sweep`)."""

    name: str = MISSING_STR
    # The training config, relative to this file or the repository, or a list of them.
    base: Any = MISSING_STR
    overrides: dict[str, Any] = field(default_factory=dict)  # fixed dotted overrides
    # base as listed -> its own fixed overrides, after ``overrides``
    base_overrides: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, Any] = field(default_factory=dict)  # dotted key -> list of values
    zip: list[list[str]] = field(default_factory=list)  # axes that vary together
    runs_root: str = "runs/sweeps"
    slurm: dict[str, Any] = field(default_factory=dict)  # resources: slurm/launch.py

    def __post_init__(self) -> None:
        import re

        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", self.name):
            raise ValueError(
                f"name: {self.name!r} must be letters, digits, '.', '_' or '-' (it names a folder)"
            )
        _non_empty(
            base=(self.base, "the path of a training config (or a list of them) is required"),
            axes=(self.axes, "must be a non-empty mapping of dotted keys to lists"),
            runs_root=(self.runs_root, "must be a folder path"),
        )


# ---------------------------------------------------------------- table specs
@dataclass
class MetricSchema:
    key: str = MISSING_STR  # a final.json key
    label: str | None = None  # default: the key with spaces
    decimals: int = 3
    better: str | None = None  # lower | higher | null: bold the best of our rows

    def __post_init__(self) -> None:
        if not 0 <= self.decimals <= 8:
            raise ValueError(f"decimals: must be an integer in 0..8, got {self.decimals}")
        if self.better not in (None, "lower", "higher"):
            raise ValueError(f"better: must be lower, higher or null, got {self.better!r}")


@dataclass
class ColumnSchema:
    label: str = MISSING_STR
    select: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value | {in: [...]}


@dataclass
class RowSchema:
    label: str = MISSING_STR
    runs: list[str] = field(default_factory=list)  # globs under runs_root
    sweep: str | None = None  # = runs: sweeps/<sweep>
    select: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] | None = None  # expected seeds: absent ones are listed as missing
    keys: dict[str, str] = field(default_factory=dict)  # metric key -> final.json key
    note: str | None = None
    source: str = "final"  # final (final.json) | cost_curve (RUN_DIR/cost_curve*/ records)

    def __post_init__(self) -> None:
        if self.source not in ("final", "cost_curve"):
            raise ValueError(f"source: unknown value {self.source!r}; valid: cost_curve, final")


@dataclass
class ReferenceSchema:
    label: str = MISSING_STR
    status: str = MISSING_STR  # confirmed | measured | unverified | recalled
    source: str | None = None
    values: dict[str, Any] = field(default_factory=dict)  # column -> number | {metric: ...}
    from_runs: dict[str, str] = field(default_factory=dict)  # metric -> final.json key
    note: str | None = None

    def __post_init__(self) -> None:
        if self.status not in ("confirmed", "measured", "unverified", "recalled"):
            raise ValueError(
                f"status: unknown value {self.status!r}; valid: confirmed, measured, unverified, recalled"
            )
        if not self.values and not self.from_runs:
            raise ValueError("values: a reference needs values or from_runs")


@dataclass
class TableSpecSchema:
    """A table spec (``configs/tables/*.yaml``; format in :mod:`cnf.tables`)."""

    name: str | None = None  # default: the file stem
    title: str | None = None
    caption: str | None = None
    runs_root: str = "runs"
    metrics: list[MetricSchema] = field(default_factory=lambda: [MetricSchema(key="test_nll")])
    column_key: str = "data.name"  # what a plain-string column selects on
    columns: list[ColumnSchema] = field(default_factory=list)
    rows: list[RowSchema] = field(default_factory=list)
    references: list[ReferenceSchema] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _non_empty(
            columns=(self.columns, "must be a non-empty list (data sets)"),
            rows=(self.rows, "must be a non-empty list (methods)"),
            metrics=(self.metrics, "must be a non-empty list"),
        )
