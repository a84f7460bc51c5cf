"""Side effects of training: rollouts, export (and, later, evaluation and tracking)."""

from thinktwice_pl.callbacks.export import HFExport
from thinktwice_pl.callbacks.rollout import RolloutCallback

__all__ = ["HFExport", "RolloutCallback"]
