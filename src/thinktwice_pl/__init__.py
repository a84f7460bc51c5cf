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
# Lightning 2.6 advertises its cloud products ("💡 Tip: ... litlogger / litmodels") in every run's log.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: not r.getMessage().startswith("💡 Tip:"))
