"""A 2-process CPU fit on the tiny model, launched by tests/test_distributed.py as a subprocess.

    python tests/dist_fit.py --strategy ddp|fsdp2 --model DIR --root DIR --max-steps N [--ckpt PATH] [--precision P]
        [--lr LR]

Lightning relaunches this script for rank 1 (gloo). Each phase: 4 problems x 4 samples, 2 optimizer steps of 2
problems, so each rank generates for 2 problems and trains 1 problem per optimizer step. Checkpoints every
phase (2 optimizer steps) under <root>/ckpt, HF export to <root>/export. Rank 0 writes <root>/result.json:
global step, how many policy tensors (and what share of their elements) moved from the initial weights, the
weights' dtypes, how many equal the export's, whether
every rank holds the same refine cache, and the data module cursor.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from thinktwice_pl.callbacks import HFExport, RectifyFortifyTracker, RolloutCallback
from thinktwice_pl.checkpointing import make_checkpoints_atomic
from thinktwice_pl.data import ProblemSource, ThinkTwiceDataModule
from thinktwice_pl.module import ThinkTwiceModule
from thinktwice_pl.parallel import close_process_group, exit_skipping_native_teardown


def main() -> None:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    root = Path(args.root)
    module = ThinkTwiceModule(
        model_name_or_path=args.model,
        problems_per_batch=4,
        mini_batch_problems=2,
        num_generations=4,
        max_completion_length=8,
        learning_rate=args.lr,
        weight_decay=0.0,
        max_tokens_per_microbatch=40,
        beta=0.05 if args.strategy == "fsdp2" else 0.0,  # FSDP2 also shards the frozen KL reference
        gradient_checkpointing=args.strategy == "fsdp2",  # activation checkpointing inside fully_shard units
    )
    data = ThinkTwiceDataModule(train=ProblemSource(num_problems=16), problems_per_batch=4, seed=0)
    rollout = RolloutCallback(
        num_generations=4, max_completion_length=8, reward="signal_rewards.even_length", reward_workers=0
    )
    strategy = (
        DDPStrategy(process_group_backend="gloo")
        if args.strategy == "ddp"
        else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
    )
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=args.max_steps,
        logger=CSVLogger(root, name="run"),
        precision=args.precision,
        callbacks=[rollout, checkpoint, HFExport(), RectifyFortifyTracker()],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    make_checkpoints_atomic(trainer.strategy)  # as the thinktwice command does: FSDP2 directories renamed into place
    trainer.fit(module, datamodule=data, ckpt_path=args.ckpt)

    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(args.model).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(Path(trainer.log_dir) / "hf_model").state_dict()
    moved = exported_same = moved_elements = elements = 0
    dtypes = set()
    for name, value in module.policy.state_dict().items():  # FSDP2: DTensor shards, gathered on every rank
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        dtypes.add(str(full.dtype))
        moved += int(not torch.equal(full, initial[name]))
        moved_elements += int((full != initial[name].to(full.dtype)).sum())
        elements += full.numel()
        exported_same += int(torch.equal(full, exported[name].to(full.dtype)))
    caches: list[object] = [None] * trainer.world_size
    torch.distributed.all_gather_object(caches, json.dumps(data.state_dict(), sort_keys=True))
    weights: list[Any] = [None] * trainer.world_size  # DDP replicas must stay identical (FSDP2 holds shards)
    if args.strategy == "ddp":
        torch.distributed.all_gather_object(weights, dict(module.policy.state_dict()))
    if trainer.is_global_zero:
        result = {
            "global_step": trainer.global_step,
            "moved": moved,
            "tensors": len(initial),
            "exported": exported_same,
            "moved_elements_frac": moved_elements / elements,
            "weight_dtypes": sorted(dtypes),
            "same_cache_on_all_ranks": len(set(caches)) == 1,
            "cursor": data.cursor,
            "same_weights_on_all_ranks": args.strategy == "ddp"
            and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]),
            "log_dir": trainer.logger.log_dir,
            "world_size": trainer.world_size,
            "pid": os.getpid(),
        }
        (root / "result.json").write_text(json.dumps(result))
    if close_process_group():  # as the thinktwice command does: a gloo group left to exit can abort the process
        exit_skipping_native_teardown(0)


if __name__ == "__main__":
    main()
