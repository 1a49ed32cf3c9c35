"""The previous release's config files still work, for one release, through automatic aliases.

``tests/data/previous_release/configs`` holds the config files, sweep files
and table specs exactly as release 0.1.0 shipped them (old key names:
``eval.solver.method``, ``model.sde: vp`` with flat ``beta_max``,
``model.flow_kwargs``, ``model.data_scale``, ...). Each training config must
resolve, with one :class:`~cnf.config.ConfigMigrationWarning` naming the moved
keys, to exactly the config the current file of the same name resolves to.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cnf.config import ConfigMigrationWarning, load_config
from cnf.sweep import load_sweep, plan
from cnf.tables import load_table_spec

REPO = Path(__file__).resolve().parents[1]
OLD = REPO / "tests" / "data" / "previous_release"
OLD_CONFIGS = sorted(
    p.relative_to(OLD)
    for p in (OLD / "configs").rglob("*.yaml")
    if p.parent.name not in ("sweeps", "tables")
)
# Data sets that need a folder: any path will do for resolving the config.
NEEDS_PATH = ("cifar10", "mnist", "celeba64")


def _overrides(rel: Path) -> list[str]:
    return ["data.path=/data"] if rel.stem in NEEDS_PATH else []


def test_the_fixture_has_every_training_config_of_the_previous_release() -> None:
    assert len(OLD_CONFIGS) == 23


@pytest.mark.parametrize("rel", OLD_CONFIGS, ids=str)
def test_old_config_resolves_to_the_current_one(rel: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = load_config(OLD / rel, _overrides(rel))
    moved = [w for w in caught if issubclass(w.category, ConfigMigrationWarning)]
    assert len(moved) == 1, [str(w.message) for w in caught]  # one warning naming all moves
    assert "previous release" in str(moved[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigMigrationWarning)  # the current file is migrated
        new = load_config(REPO / rel, _overrides(rel))
    assert OmegaConf.to_container(old) == OmegaConf.to_container(new)


def test_old_override_keys_are_aliased() -> None:
    with pytest.warns(ConfigMigrationWarning, match=r"eval\.solver\.method → eval\.solver\.name"):
        old = load_config(
            REPO / "configs/ffjord/toy.yaml", ["eval.solver.method=rk4", "eval.solver.steps=4"]
        )
    assert old.eval.solver.name == "rk4"


def test_old_sweeps_and_table_specs_load() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigMigrationWarning)
        for path in sorted((OLD / "configs" / "sweeps").glob("*.yaml")):
            current = load_sweep(REPO / "configs" / "sweeps" / path.name)
            old = load_sweep(path)
            assert len(plan(old)) == len(plan(current)) > 0
        for path in sorted((OLD / "configs" / "tables").glob("*.yaml")):
            spec = load_table_spec(path)
            current = load_table_spec(REPO / "configs" / "tables" / path.name)
            assert [r.label for r in spec.rows] == [r.label for r in current.rows]
