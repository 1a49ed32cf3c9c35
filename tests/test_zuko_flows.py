"""zuko's MADE, MAF and neural spline flow as ``flow``-family backends (``model.flow.name: zuko.*``).

In float64, with every parameter perturbed at random (zuko starts close to the
identity, which would hide errors): the log-determinant equals
``log|det J|`` of the brute-force Jacobian of the forward map, ``inverse``
undoes ``forward``, and the model's NLL is ``-log N(z; 0, I) - logdet``. The
options are the zuko constructors' keyword arguments with their defaults; an
unknown option or activation, and a missing zuko, are one-line errors.
"""

from __future__ import annotations

import inspect
import subprocess

import pytest
import torch
from conftest import PYTHON, REPO, assert_clean_failure, build_family, subprocess_env

from cnf.config import ConfigError
from cnf.flows.registry import FLOWS, build_flow

D = 4
CASES = {
    "zuko.made": {"hidden_features": [16, 16]},
    "zuko.maf": {"transforms": 3, "hidden_features": [16], "activation": "tanh"},
    "zuko.maf-randperm": {"transforms": 2, "randperm": True, "hidden_features": [16]},
    "zuko.nsf": {"transforms": 2, "bins": 5, "hidden_features": [16]},
    "zuko.nsf-coupling": {"transforms": 2, "passes": 2, "hidden_features": [16]},
}


def perturbed(case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    flow = build_flow(case.split("-")[0], event_shape=(D,), **CASES[case]).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow


@pytest.mark.parametrize("case", sorted(CASES))
def test_logdet_against_brute_force_jacobian_and_round_trip(case: str) -> None:
    flow = perturbed(case)
    x = 1.5 * torch.randn(6, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z, logdet = flow(x)
    assert z.shape == x.shape and logdet.shape == (6,) and z.dtype == torch.float64
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[i])
        assert torch.allclose(logdet[i], torch.linalg.slogdet(jac)[1], atol=1e-10), case
    assert (z - x).abs().max() > 0.1  # far from the identity
    assert torch.allclose(flow.inverse(z), x, atol=1e-9)


def test_flow_model_density_and_samples() -> None:
    model = build_family(
        "flow", {"flow": {"name": "zuko.maf", "transforms": 2, "hidden_features": [8]}}, (D,)
    ).double()
    x = torch.randn(5, D, dtype=torch.float64)
    z, logdet = model.flow(x)
    want = 0.5 * (z**2).sum(1) + 0.5 * D * torch.log(torch.tensor(2 * torch.pi)) - logdet
    assert torch.allclose(model.evaluate(x).nll, want.detach(), atol=1e-12)
    samples = model.sample(7).x
    assert samples.shape == (7, D) and torch.isfinite(samples).all()


def _zuko_defaults(*constructors) -> dict[str, object]:
    out: dict[str, object] = {}
    for c in constructors:
        for p in inspect.signature(c).parameters.values():
            if p.default is not inspect.Parameter.empty:
                out.setdefault(p.name, p.default)
    return out


def test_options_are_the_zuko_constructors_keyword_arguments() -> None:
    from zuko.flows import MAF, NSF
    from zuko.flows.autoregressive import MaskedAutoregressiveTransform
    from zuko.nn import MaskedMLP
    from zuko.transforms import MonotonicAffineTransform

    chain = (NSF.__init__, MAF.__init__, MaskedAutoregressiveTransform.__init__, MaskedMLP.__init__)
    theirs = _zuko_defaults(*chain)
    ours = inspect.signature(FLOWS["zuko.maf"].builder("vector")).parameters
    options = {k: p.default for k, p in ours.items() if p.kind is p.KEYWORD_ONLY}
    assert set(options) <= set(theirs)
    for key, default in options.items():
        if key == "activation":  # by name here; None (= ReLU) there
            assert default == "relu" and theirs[key] is None
        elif key == "univariate":  # by name here (affine | spline); a constructor there
            assert default == "affine" and theirs[key] is MonotonicAffineTransform
        elif key == "hidden_features":
            assert list(default) == list(theirs[key])
        else:
            assert default == theirs[key], key
    # The registered presets: the same options, other defaults.
    made, nsf = (FLOWS[n].builder("vector") for n in ("zuko.made", "zuko.nsf"))
    assert made.option_defaults == {"transforms": 1}
    assert nsf.option_defaults == {"univariate": "spline"}
    assert inspect.signature(made).parameters == ours == inspect.signature(nsf).parameters


def test_unknown_option_and_activation_are_config_errors(tmp_path) -> None:
    from cnf.config import load_config

    base = REPO / "configs" / "flows" / "maf_tabular.yaml"
    with pytest.raises(ConfigError, match="unknown config key 'model.flow.nope'"):
        load_config(base, ["model.flow.nope=4", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="only for univariate=spline"):
        build_flow("zuko.maf", event_shape=(3,), bins=4)
    with pytest.raises(ConfigError, match="model.flow.activation: unknown value 'relux'"):
        build_flow("zuko.maf", event_shape=(3,), activation="relux")
    with pytest.raises(ValueError, match="no image builder"):
        build_flow("zuko.nsf", event_shape=(1, 4, 4))


def test_missing_zuko_is_one_line_naming_the_extra(tmp_path) -> None:
    fake = tmp_path / "site" / "zuko"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named zuko')\n")
    env = subprocess_env(PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run(
        [
            PYTHON,
            "experiments/train.py",
            "--config",
            "configs/flows/maf_tabular.yaml",
            "data.name=8gaussians",
            "data.path=null",
            f"run.dir={tmp_path / 'run'}",
            "track.wandb=disabled",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = assert_clean_failure(proc.returncode, proc.stderr)
    assert "zuko.maf and zuko.nsf need zuko, an optional extra" in line and "'.[zuko]'" in line
    assert not (tmp_path / "run").exists()
