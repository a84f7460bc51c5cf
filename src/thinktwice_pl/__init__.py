"""thinktwice_pl: ThinkTwice (GRPO on alternating solve and refine phases) on the PyTorch Lightning fit loop.

Importing the package is light: it imports no model, vLLM or bitsandbytes code. Import the pieces
from their modules (``thinktwice_pl.module``, ``thinktwice_pl.data``, ...).
"""

__version__ = "0.1.0"
