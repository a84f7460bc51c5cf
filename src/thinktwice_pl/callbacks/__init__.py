"""Side effects of training: rollouts, evaluation, per-phase logging, rectify/fortify tracking, export, crash
checkpoints."""

from thinktwice_pl.callbacks.crash import CrashCheckpoint
from thinktwice_pl.callbacks.evaluation import Evaluation
from thinktwice_pl.callbacks.export import HFExport
from thinktwice_pl.callbacks.phase_log import PhaseLogger
from thinktwice_pl.callbacks.rollout import RolloutCallback
from thinktwice_pl.callbacks.tracker import RectifyFortifyTracker

__all__ = ["CrashCheckpoint", "Evaluation", "HFExport", "PhaseLogger", "RectifyFortifyTracker", "RolloutCallback"]
