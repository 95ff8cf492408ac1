"""Training summaries: what a fit did, iteration by iteration.

A summary lives on the fitted model (``model.summary``) until the model is saved; like Spark's
own training summaries it is not persisted, so a loaded model has ``hasSummary == False``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List


@dataclass
class TrainingSummary:
    """Per-iteration record of one fit.

    Attributes
    ----------
    algorithm : str
        ``"als"``, ``"mascot"`` or ``"pruned"``.
    iterations : list of dict
        One entry per iteration (ALS) or epoch (SGD), each with at least ``iteration`` (1-based)
        and ``seconds``; optional metrics such as ``trainRmse`` or ``validationRmse``.
    setup_seconds : float
        Time before the first iteration (validation, blocking, initialization).
    total_seconds : float
    details : dict
        Estimator-specific facts (for example the dataflow ALS chose, or which MASCOT groups
        switched to FP32).
    """

    algorithm: str
    iterations: List[Dict[str, Any]] = field(default_factory=list)
    setup_seconds: float = 0.0
    total_seconds: float = 0.0
    details: Dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str) -> List[Any]:
        """The values of one per-iteration metric, ``None`` where an iteration lacks it."""
        return [entry.get(name) for entry in self.iterations]

    @property
    def totalIterations(self) -> int:
        return len(self.iterations)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)
