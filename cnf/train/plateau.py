"""Validation-driven training control: learning-rate drops on a plateau and early stopping.

The rule of FFJORD's tabular training script (Grathwohl et al. 2019), made
generic: after every validation, a value strictly below the best so far is an
improvement (the count of validations without one goes back to 0), anything
else — a NaN included — adds one to the count. Learning-rate drop ``k`` happens
once, at the first validation where ``k`` drops are done and the count exceeds
``drop_after[k]``; drops are never undone. Training stops at the first
validation where the count exceeds ``stop_after`` (0: never). FFJORD uses
``drop_after = (10, 20)`` with factor 0.1 and ``stop_after = 30``, validating
every 200 iterations.

The state is plain numbers (:meth:`Plateau.state_dict`), stored in the
training checkpoint, so a resumed run takes the same decisions.

Example:
    >>> p = Plateau(drop_after=(1,), stop_after=2)
    >>> [p.update(v, i) for i, v in enumerate([3.0, 2.0, 2.5, 2.5, 2.5])]
    [True, True, False, False, False]
    >>> p.drops, p.stopped, p.best, p.best_iteration
    (1, True, 2.0, 1)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Plateau"]


@dataclass
class Plateau:
    """Best validation value, validations without improvement, drops done, stop flag.

    Attributes:
        drop_after: Counts after which the learning rate drops, increasing.
        stop_after: Count after which training stops (0: never).
        best: Best validation value so far (``inf`` before the first).
        best_iteration: Iteration of ``best`` (None before the first improvement).
        bad: Validations in a row without improvement.
        drops: Learning-rate drops done.
        stopped: The stop rule has fired.
        validated_at: Iteration of the last validation (None before the first).
    """

    drop_after: tuple[int, ...] = ()
    stop_after: int = 0
    best: float = math.inf
    best_iteration: int | None = None
    bad: int = 0
    drops: int = 0
    stopped: bool = False
    validated_at: int | None = None

    def update(self, value: float, iteration: int) -> bool:
        """Record one validation; returns whether it improved on the best."""
        improved = value < self.best  # False for NaN
        if improved:
            self.best, self.best_iteration, self.bad = float(value), iteration, 0
        else:
            self.bad += 1
        if self.drops < len(self.drop_after) and self.bad > self.drop_after[self.drops]:
            self.drops += 1
        if self.stop_after and self.bad > self.stop_after:
            self.stopped = True
        self.validated_at = iteration
        return improved

    def state_dict(self) -> dict[str, Any]:
        """The counters (not the rule, which comes from the config)."""
        state = asdict(self)
        del state["drop_after"], state["stop_after"]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
