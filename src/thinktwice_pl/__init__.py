"""thinktwice_pl: ThinkTwice (GRPO on alternating solve and refine phases) on the PyTorch Lightning fit loop.

Importing the package is light: it imports no model, vLLM or bitsandbytes code. Import the pieces
from their modules (``thinktwice_pl.module``, ``thinktwice_pl.data``, ...).
"""

__version__ = "0.1.0"

import logging
import warnings

# The foreign log lines filtered, each with no cause of ours to fix (everything else reaches the user):
# - Lightning 2.6's CombinedLoader builds torch.utils._pytree.LeafSpec, which torch >= 2.13 deprecates with a
#   FutureWarning on every epoch's loaders;
# - Lightning 2.6's ModelCheckpoint(every_n_train_steps=...) under manual optimization warns at every save that
#   the checkpoint holds the weights after the optimizer step, which is what a phase checkpoint must hold.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
# - Lightning 2.6 recommends `self.log(..., sync_dist=True)` for epoch-level values whenever torch.distributed is
#   initialized, and an in-process vLLM engine initializes a world-size-1 group in single-device runs, where
#   sync_dist=True cannot silence it (Lightning turns it off on one device). Only for the evaluation's own names:
#   callbacks/evaluation.py reduces them across ranks before it logs them.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val/|test/|perf/val_s|perf/test_s)")
# Lightning 2.6 advertises its cloud products ("💡 Tip: ... litlogger / litmodels") in every run's log.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: not r.getMessage().startswith("💡 Tip:"))
# vLLM (CPU backend, engine inside this process; loggers exist before vllm is imported, so no vllm import here):
# - its CPU worker replaces torch.set_num_threads by a stub that warns "CPU backend doesn't allow to use
#   torch.set_num_threads after the thread binding, skip it", and vLLM's own start-up then calls it (serving threads,
#   chat-template warm-up). An in-process engine binds no threads; VLLMRolloutEngine puts the real function back once
#   the engine has started and sets its threads with it, so only vLLM's own start-up calls are left to silence;
# - each weight push (reload_weights) warns "RotaryEmbedding: Failed to load weights" (the rotary layer holds no
#   weights: its cos/sin cache comes from the config) and, for tied embeddings, "ParallelLMHead: Failed to load
#   weights" (vLLM's loader skips lm_head.* when tied; VLLMRolloutEngine rebuilds the head's packed copy from the
#   pushed embedding after every push, tested against HF log-probs and logged each phase as sampler_logprob_diff).
_VLLM_NOISE = {
    "vllm.v1.worker.cpu_worker": ("CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding",),
    "vllm.model_executor.model_loader.reload.layerwise": (
        "RotaryEmbedding: Failed to load weights",
        "ParallelLMHead: Failed to load weights",
    ),
}


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


for _name, _starts in _VLLM_NOISE.items():
    logging.getLogger(_name).addFilter(_DropMessages(_starts))
