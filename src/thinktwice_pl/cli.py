"""The ``thinktwice`` command: LightningCLI with the ThinkTwice module, data module and rollout settings.

    thinktwice fit --config configs/tiny.yaml
    thinktwice fit --config configs/tiny.yaml --ckpt_path last        # resume this run's newest checkpoint
    thinktwice fit --config configs/quickstart.yaml --trainer.max_steps 4
    thinktwice fit --print_config
    thinktwice validate --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    thinktwice validate --config configs/quickstart.yaml --model.model_name_or_path <HF model directory>
    thinktwice test --config configs/qwen3-4b/thinktwice.yaml --model.model_name_or_path <HF model directory>

Values shared by several parts are declared once and linked: ``data.problems_per_batch`` feeds the
module's mini-batch check; ``rollout.num_generations``, ``rollout.temperature`` and
``rollout.max_completion_length`` feed the loss.

Failures and resuming (`thinktwice_pl.resume`, `thinktwice_pl.callbacks.CrashCheckpoint`): a fit starts fresh
unless ``--ckpt_path`` is given (a path, or ``last``: the newest checkpoint of this run's folder), and resumes into
the version folder of its checkpoint, so ``metrics.csv`` continues. Every checkpoint is written atomically. An error
the user can fix prints one line (``error: ...``, exit code 2); ``--debug`` or ``THINKTWICE_DEBUG=1`` shows its
traceback. A crash prints, last, the command that resumes the run.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import jsonargparse
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from thinktwice_pl.callbacks.crash import CrashCheckpoint
from thinktwice_pl.callbacks.evaluation import Evaluation
from thinktwice_pl.callbacks.rollout import RolloutCallback
from thinktwice_pl.checkpointing import checkpoint_progress, make_checkpoints_atomic, remove_partials
from thinktwice_pl.data import ThinkTwiceDataModule
from thinktwice_pl.errors import DEBUG_ENV, UserError, describe, notes_of, report
from thinktwice_pl.hostmem import configure_host_allocator
from thinktwice_pl.lightning_shims import ConfigKeepingCLI, fixed_version
from thinktwice_pl.log_filters import DropMessages
from thinktwice_pl.module import ThinkTwiceModule
from thinktwice_pl.parallel import close_process_group, exit_skipping_native_teardown
from thinktwice_pl.resume import (
    Continuation,
    display_path,
    free_name,
    install_metrics_writer,
    invocation,
    resolve_last,
    set_version,
    version_folder_of,
)

TRAINER_DEFAULTS: dict[str, Any] = {
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
    # An integer val_check_interval counts phases over the whole run, across data epochs (Lightning's default of
    # 1 restarts the count at every epoch, so twins with different epoch lengths would validate at other steps).
    "check_val_every_n_epoch": None,
}
"""The command's defaults for ``trainer:`` settings a config does not give."""


class ThinkTwiceCLI(ConfigKeepingCLI):
    """LightningCLI with ``rollout:`` and ``eval:`` sections (the always-present RolloutCallback and Evaluation
    callbacks), linked arguments, and the resume rules of `thinktwice_pl.resume`. A ``--ckpt_path`` never replaces
    the ``model:`` config (`ConfigKeepingCLI`): `before_fit` warns where they differ.

    Args:
        command: the command line as the user typed it (program and arguments), for the resume command printed
            after a crash; None: ``sys.argv``. The other arguments are LightningCLI's.
    """

    def __init__(self, *args: Any, command: list[str] | None = None, **kwargs: Any) -> None:
        self.command = command
        self.continuation: Continuation | None = None
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RolloutCallback, "rollout")
        parser.add_lightning_class_args(Evaluation, "eval")
        parser.link_arguments("data.problems_per_batch", "model.problems_per_batch")
        parser.link_arguments("rollout.num_generations", "model.num_generations")
        parser.link_arguments("rollout.temperature", "model.temperature")
        parser.link_arguments("rollout.max_completion_length", "model.max_completion_length")

    def before_fit(self) -> None:
        """Refuse Lightning's OnExceptionCheckpoint, make checkpoints atomic, resolve ``--ckpt_path``, and pick
        the run's version folder (the checkpoint's own when resuming)."""
        trainer = self.trainer
        _refuse_on_exception_checkpoint(trainer)
        make_checkpoints_atomic(trainer.strategy)
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, CrashCheckpoint):
                callback.command = self.command
        ckpt = self._resolve_ckpt_path("fit")
        if ckpt is None:
            self._refuse_an_occupied_version_folder()
            for logger in trainer.loggers:
                install_metrics_writer(logger, keep=None)
            return
        progress = checkpoint_progress(ckpt, weights_only=self.config_init["fit"].get("weights_only"))
        _warn_if_model_config_differs(progress.model_hparams, dict(self.model.hparams))
        version = version_folder_of(Path(ckpt), trainer)
        if version is None:  # a checkpoint from elsewhere: a new version folder, its rows start at its phase count
            for logger in trainer.loggers:
                install_metrics_writer(logger, keep=None)
            return
        set_version(trainer.loggers, version)
        log_dir = Path(ckpt).resolve().parent.parent
        self.continuation = Continuation(version, log_dir, progress)
        for logger in trainer.loggers:
            install_metrics_writer(logger, keep=self.continuation.keep)
        if getattr(rank_zero_only, "rank", 0) == 0:  # before a DDP launch the strategy's ranks are not set yet
            remove_partials(log_dir / "checkpoints")
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, SaveConfigCallback) and (log_dir / callback.config_filename).exists():
                callback.config_filename = free_name(log_dir, "config.resume", ".yaml")
        # Lightning warns that the folder it is asked to continue in is not empty: resuming there is the point
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        phases = f"{progress.phases} phases, " if progress.phases is not None else ""
        rank_zero_info(
            f"Resuming from {display_path(Path(ckpt))} ({phases}{progress.global_step} optimizer steps); "
            f"continuing in {display_path(log_dir)}"
        )

    def _refuse_an_occupied_version_folder(self) -> None:
        """A fresh fit into a version folder that holds a run (a fixed ``trainer.logger.init_args.version``) would
        overwrite its files: refuse, naming the way to resume it or to start beside it."""
        logger = self.trainer.loggers[0] if self.trainer.loggers else None
        if logger is None or fixed_version(logger) is None or not hasattr(logger, "log_dir"):
            return  # no logger, or a version Lightning numbers itself: always a new folder
        if (Path(logger.log_dir) / "config.yaml").exists():
            raise UserError(
                f"{display_path(Path(logger.log_dir))} already holds a run (its config.yaml): resume it with "
                "--ckpt_path last, or set trainer.logger.init_args.version to a new name (or unset it)"
            )

    def before_validate(self) -> None:
        self._resolve_ckpt_path("validate")

    def before_test(self) -> None:
        self._resolve_ckpt_path("test")

    def _resolve_ckpt_path(self, subcommand: str) -> str | None:
        """``--ckpt_path``: ``last`` becomes the newest checkpoint of this run's folder (none: a fresh start, said
        so); a path must exist; ``best`` and ``hpc`` are refused (they name checkpoints of an earlier call in the
        same process)."""
        config = self.config_init[subcommand]
        ckpt = config.get("ckpt_path")
        if ckpt is None:
            return None
        if ckpt in ("best", "hpc"):
            raise UserError(f"--ckpt_path {ckpt} is not supported here; give a checkpoint path, or last")
        if ckpt == "last":
            found = resolve_last(self.trainer)
            if found is None:
                if subcommand != "fit":
                    raise UserError("--ckpt_path last: this run's folder holds no checkpoint; give a checkpoint path")
                rank_zero_info("--ckpt_path last: this run's folder holds no checkpoint yet; starting fresh")
                config["ckpt_path"] = None
                return None
            ckpt = display_path(found)
            rank_zero_info(f"--ckpt_path last: {ckpt}")
        elif not os.path.exists(ckpt):
            dangling = " (a link to a checkpoint that no longer exists)" if os.path.islink(ckpt) else ""
            raise UserError(f"--ckpt_path {ckpt} does not exist{dangling}; give a checkpoint path, or last")
        config["ckpt_path"] = ckpt
        return str(ckpt)


def _warn_if_model_config_differs(trained: dict[str, Any], ours: dict[str, Any]) -> None:
    differ = [
        f"model.{key}={describe(trained[key])} (this run: {describe(ours[key])})"
        for key in sorted(trained.keys() & ours.keys())
        if trained[key] != ours[key]
    ]
    if differ:
        rank_zero_warn(
            f"the checkpoint was trained with {', '.join(differ)}; this run goes on with its own config's values "
            "(the optimizer state, learning rate included, comes from the checkpoint). To continue the same "
            "experiment, resume with the command line it was started with"
        )


def _refuse_on_exception_checkpoint(trainer: Any) -> None:
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    if any(isinstance(c, OnExceptionCheckpoint) for c in trainer.callbacks):
        raise UserError(
            "trainer.callbacks holds lightning's OnExceptionCheckpoint, which makes every later fit with this config "
            "resume from its file without being asked; replace it with thinktwice_pl.callbacks.CrashCheckpoint "
            "(no arguments: it saves into the run's own checkpoints folder and prints the command that resumes)"
        )


_LOG_FILTERS = {
    # Lightning 2.6 advertises its cloud products ("💡 Tip: ... litlogger / litmodels") in every run's log.
    "lightning.pytorch.utilities.rank_zero": DropMessages("💡 Tip:"),
}


def filter_foreign_noise() -> None:
    """Silences the warnings and log lines of Lightning that have no cause of ours to fix (everything else reaches the
    user). Installed by the command, not on import: code that imports the package keeps its warnings. vLLM's own
    lines are handled where the engine starts (`thinktwice_pl.rollout.vllm_startup`)."""
    # Lightning 2.6's CombinedLoader builds torch.utils._pytree.LeafSpec, which torch >= 2.13 deprecates, on every
    # epoch's loaders.
    leaf_spec = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
    warnings.filterwarnings("ignore", message=leaf_spec, category=FutureWarning)
    # ModelCheckpoint(every_n_train_steps=...) under manual optimization warns that the checkpoint holds the weights
    # after the optimizer step, which is what a phase checkpoint must hold.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
    # Lightning recommends sync_dist=True for epoch-level values whenever torch.distributed is initialized, which an
    # in-process vLLM engine does on one device, where sync_dist=True cannot silence it. Only the evaluation's
    # names: callbacks/evaluation.py reduces them across ranks before it logs them.
    evaluation_names = r"It is recommended to use `self\.log\('(val/|test/|perf/val_s|perf/test_s)"
    warnings.filterwarnings("ignore", message=evaluation_names)
    for name, log_filter in _LOG_FILTERS.items():
        logging.getLogger(name).addFilter(log_filter)  # the same object: added once however often main runs


def main(args: list[str] | None = None) -> None:
    """The ``thinktwice`` console script (and ``python -m thinktwice_pl``); `args` replaces ``sys.argv[1:]``.

    ``--debug`` anywhere in the arguments (or ``THINKTWICE_DEBUG=1``) prints the traceback of user errors too."""
    argv = list(sys.argv[1:] if args is None else args)
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"  # also for the processes a DDP launch starts with this command line
        if args is None:
            sys.argv[1:] = argv
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    command = invocation(argv) if args is None else ["thinktwice", *argv]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    filter_foreign_noise()
    configure_host_allocator()
    if args is None:  # the command: the objects of the imports live as long as the process; frozen, the collector's
        # full passes stop walking them. Not for calls from Python (tests), whose later garbage would stay frozen.
        gc.freeze()
    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        ThinkTwiceCLI(
            ThinkTwiceModule,
            ThinkTwiceDataModule,
            seed_everything_default=0,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": False},
            args=None if args is None else argv,  # None: LightningCLI reads sys.argv (and does not warn)
            command=command,
        )
        if close_process_group() and args is None:  # the command itself, not a call from Python (tests)
            exit_skipping_native_teardown(0)
    except SystemExit as stop:  # --help, a parse error (printed by jsonargparse), Ctrl-C or SIGTERM during fit
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(stop, SIGTERMException) and getattr(rank_zero_only, "rank", 0) == 0:  # once, not per rank
            print("stopped: SIGTERM received (the current phase was finished first)", file=sys.stderr)
        for note in notes_of(stop):
            print(note, file=sys.stderr)
        if isinstance(stop, SIGTERMException):
            raise SystemExit(143) from None
        raise
    except Exception as error:
        raise SystemExit(report(error, debug=debug)) from None
    finally:
        close_process_group()


if __name__ == "__main__":
    main()
