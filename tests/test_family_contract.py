"""Adding a family is a model module, its schema and a config file — nothing else.

The family below is written the way ARCHITECTURE.md's checklist says, but
outside the package (so nothing in ``cnf/`` can know about it): a diagonal
Gaussian fitted by maximum likelihood. Registering it is enough for the
config loader, the training loop, the evaluation module and the
likelihood-vs-cost tool to handle it — and its numbers are checked against
the closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from cnf.config import ConfigError, load_config
from cnf.cost import cost_curve
from cnf.models.base import (
    MODELS,
    EvalOutput,
    GenerativeModel,
    LossOutput,
    SampleOutput,
    register_family,
)
from cnf.rundir import load_run
from cnf.train.loop import Trainer


# ---- 1. the schema (in a real family: a dataclass in cnf/schema.py)
@dataclass
class GaussianSchema:
    family: str = "diag_gaussian"
    init_log_std: float = 0.0


# ---- 2. the model module (in a real family: cnf/models/diag_gaussian.py)
@dataclass(frozen=True)
class GaussianSettings:
    temperature: float = 1.0  # a sampling knob, so the cost grid has something to vary


class DiagonalGaussian(GenerativeModel):
    """``x ~ N(μ, diag σ²)``: closed-form NLL, a one-line sampler."""

    Settings = GaussianSettings

    def __init__(self, event_shape: tuple[int, ...], init_log_std: float) -> None:
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.mu = torch.nn.Parameter(torch.zeros(event_shape))
        self.log_std = torch.nn.Parameter(torch.full(event_shape, init_log_std))
        self.settings = GaussianSettings()

    def nll(self, x: Tensor) -> Tensor:
        z = (x - self.mu) / self.log_std.exp()
        d = x[0].numel()
        return (
            0.5 * z.pow(2).flatten(1).sum(1) + self.log_std.sum() + 0.5 * d * math.log(2 * math.pi)
        )

    def training_loss(self, x: Tensor) -> LossOutput:
        loss = self.nll(x).mean()
        return LossOutput(loss, {"nll": float(loss.detach())})

    def _evaluate(self, x: Tensor, s: GaussianSettings) -> EvalOutput:
        return EvalOutput(nll=self.nll(x), stats={"nfe": 0.0})

    def _sample(
        self, n: int, s: GaussianSettings, generator: torch.Generator | None
    ) -> SampleOutput:
        eps = torch.randn((n, *self.event_shape), generator=generator, dtype=self.mu.dtype)
        return SampleOutput(self.mu + s.temperature * self.log_std.exp() * eps, {"nfe": 0.0})

    def default_cost_grid(self) -> list[dict]:
        return [{"temperature": t} for t in (0.5, 1.0)]


def _build(cfg: GaussianSchema, event_shape: tuple[int, ...], eval_cfg) -> DiagonalGaussian:
    return DiagonalGaussian(event_shape, cfg.init_log_std)


@pytest.fixture(scope="module", autouse=True)
def registered():
    register_family("diag_gaussian", GaussianSchema)(_build)
    yield
    MODELS._entries.pop("diag_gaussian")  # leave the registry as the other tests expect it


# ---- 3. the config file
CONFIG = """
seed: 0
device: cpu
dtype: float64
data: {name: file, path: PATH, standardize: false}
model: {family: diag_gaussian, init_log_std: 0.5}
train: {iters: 300, batch_size: 200, lr: 0.05, log_every: 50, ckpt_every: 100}
eval: {batch_size: 1000, num_samples: 500, plots: false}
track: {wandb: disabled}
"""


def test_a_family_registered_from_outside_trains_evaluates_and_sweeps_costs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mu, sigma = np.array([1.0, -2.0, 0.5]), np.array([0.5, 2.0, 1.0])
    np.save(tmp_path / "x.npy", mu + sigma * rng.normal(size=(20_000, 3)))
    (tmp_path / "c.yaml").write_text(CONFIG.replace("PATH", str(tmp_path / "x.npy")))
    cfg = load_config(tmp_path / "c.yaml", [f"run.dir={tmp_path / 'run'}"])
    assert cfg.model.init_log_std == 0.5  # the schema's key, typed and validated

    trainer = Trainer(cfg, log=lambda _: None, progress=False)
    trainer.prepare()
    assert trainer.train() == "finished"
    final = trainer.final_metrics()
    # The maximum-likelihood fit of a diagonal Gaussian: the test NLL approaches the
    # closed-form entropy H = Σ log σ + (D/2) log(2πe) of the data's Gaussian.
    entropy = float(np.log(sigma).sum() + 1.5 * math.log(2 * math.pi * math.e))
    assert final["test_nll"] == pytest.approx(entropy, abs=4 * final["test_nll_stderr"] + 0.01)

    run = load_run(tmp_path / "run", [])  # the run folder reloads it like any family
    assert isinstance(run.model, DiagonalGaussian)
    rows = cost_curve(run.model, run.data, num_test=1000, num_samples=500, seed=0)
    assert [r["setting"] for r in rows] == [{"temperature": 0.5}, {"temperature": 1.0}]
    assert rows[0]["nll"] == rows[1]["nll"]  # the knob changes samples, not the likelihood
    assert rows[1]["sample_mmd2"] < rows[0]["sample_mmd2"]  # τ = 1 samples the fitted model


def test_its_schema_rejects_unknown_keys(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((100, 2)))
    (tmp_path / "c.yaml").write_text(CONFIG.replace("PATH", str(tmp_path / "x.npy")))
    with pytest.raises(ConfigError, match="model.init_log_sdt"):
        load_config(tmp_path / "c.yaml", ["model.init_log_sdt=1"])


def test_the_shipped_families_are_registered_the_same_way() -> None:
    assert set(MODELS) >= {"ffjord", "fm", "score", "diffflow", "flow", "indm"}
    assert all(isinstance(f.schema, type) for f in MODELS.values())
