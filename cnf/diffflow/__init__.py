"""DiffFlow: diffusion normalizing flows with a learned forward drift (docs/methods.md §5).

* :mod:`cnf.diffflow.schedules` — time grids, diffusion schedules ``g(t)``,
  fixed base drifts (registries).
* :mod:`cnf.diffflow.chain` — the discretised forward/backward chains, the
  path NELBO, its memory-saving ("stochastic adjoint") gradient, samplers.

The :class:`~cnf.models.base.GenerativeModel` built from a config is
:class:`cnf.models.diffflow.DiffFlow` (family ``diffflow``).

References:
    Zhang & Chen, "Diffusion Normalizing Flow", NeurIPS 2021, arXiv:2110.07579.
"""

from cnf.diffflow.chain import (
    BACKPROP_MODES,
    DIFFFLOW_SAMPLERS,
    CheckpointedPathNELBO,
    Dynamics,
    PathNELBO,
    backward_noise,
    forward_noise,
    forward_path,
    gaussian_prior_nll,
    path_nelbo,
    run_backward,
)
from cnf.diffflow.schedules import (
    BASE_DRIFTS,
    DIFFUSIONS,
    GRIDS,
    DiffusionSchedule,
    TimeGrid,
    build_diffusion,
)

__all__ = [
    "BACKPROP_MODES",
    "BASE_DRIFTS",
    "CheckpointedPathNELBO",
    "DIFFUSIONS",
    "DiffusionSchedule",
    "Dynamics",
    "GRIDS",
    "PathNELBO",
    "DIFFFLOW_SAMPLERS",
    "TimeGrid",
    "backward_noise",
    "build_diffusion",
    "forward_noise",
    "forward_path",
    "gaussian_prior_nll",
    "path_nelbo",
    "run_backward",
]
