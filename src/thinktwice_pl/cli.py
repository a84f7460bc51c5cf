"""The ``thinktwice`` command: LightningCLI with the ThinkTwice module, data module and rollout settings.

    thinktwice fit --config configs/tiny.yaml
    thinktwice fit --config configs/quickstart.yaml --trainer.max_steps 4
    thinktwice fit --print_config
    thinktwice validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    thinktwice validate --config configs/quickstart.yaml --model.model_name_or_path <HF model directory>
    thinktwice test --config configs/qwen3-4b/thinktwice.yaml --model.model_name_or_path <HF model directory>

Values shared by several parts are declared once and linked: ``data.problems_per_batch`` feeds the
module's mini-batch check; ``rollout.num_generations``, ``rollout.temperature`` and
``rollout.max_completion_length`` feed the loss.
"""

from __future__ import annotations

import os
from typing import Any

import jsonargparse
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from thinktwice_pl.callbacks.evaluation import Evaluation
from thinktwice_pl.callbacks.rollout import RolloutCallback
from thinktwice_pl.data import ThinkTwiceDataModule
from thinktwice_pl.module import ThinkTwiceModule


class ThinkTwiceCLI(LightningCLI):
    """LightningCLI with ``rollout:`` and ``eval:`` sections (the always-present RolloutCallback and Evaluation
    callbacks) and linked arguments."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RolloutCallback, "rollout")
        parser.add_lightning_class_args(Evaluation, "eval")
        parser.link_arguments("data.problems_per_batch", "model.problems_per_batch")
        parser.link_arguments("rollout.num_generations", "model.num_generations")
        parser.link_arguments("rollout.temperature", "model.temperature")
        parser.link_arguments("rollout.max_completion_length", "model.max_completion_length")


def main(args: Any = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    ThinkTwiceCLI(
        ThinkTwiceModule,
        ThinkTwiceDataModule,
        seed_everything_default=0,
        trainer_defaults={"log_every_n_steps": 1, "num_sanity_val_steps": 0},
        save_config_kwargs={"overwrite": False},
        args=args,
    )


if __name__ == "__main__":
    main()
