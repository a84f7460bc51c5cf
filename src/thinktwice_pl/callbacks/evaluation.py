"""Evaluation: pass@k before and after one self-refinement, and the transition rates (METHOD.md section 6).

For every problem of a validation/test benchmark:

1. n answers are sampled with the evaluation settings (temperature 0.7, top-p 0.8, top-k 20, 3000
   tokens by default) -> ``<split>/<benchmark>/solve/pass@<k>``;
2. every answer is refined once with the review instruction (greedy by default), in the same
   three-turn chat as training -> ``<split>/<benchmark>/refine/pass@<k>``;
3. one greedy answer and its greedy refinement -> ``<split>/<benchmark>/{solve,refine}/greedy_acc`` and
   ``<split>/transition/{fix_wrong, damage_correct, keep_right, stay_wrong}`` (over all benchmarks).

``<split>/avg/...`` is the macro average over benchmarks (``<split>/avg/solve/greedy_acc`` is the paper's
model-selection score, METHOD.md section 4), ``perf/<split>_s`` the wall time. ``<split>`` is ``val``
(``thinktwice validate`` and validation during fit) or ``test`` (``thinktwice test``). Validation may use
cheaper settings than test (``val_num_samples``; 0 = the greedy pass only, as the paper's model selection),
and during fit it also runs once before the first phase, so every validation curve starts at the base model.

Generation goes through the engine of the `RolloutCallback` (HF or vLLM alike), prompts and grading
use its prompt texts, prompt limit and grader, so evaluation measures the same task the policy is trained
on. The chat template's default system prompt is kept in evaluation prompts unless
``eval.remove_system_prompt`` is set, as the reference evaluation kept Olmo-3's while its training removed it.
During fit the rows are logged at the `ThinkTwiceDataModule`'s ``cursor`` (phases completed), which also
tells which validation a resumed run still owes.
"""

from __future__ import annotations

import csv
import logging
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from thinktwice_pl.callbacks.rollout import RolloutCallback, phase_seed
from thinktwice_pl.data import thinktwice_data
from thinktwice_pl.errors import UserError
from thinktwice_pl.lightning_shims import run_validation, validation_due
from thinktwice_pl.metrics import PassAtK, Transitions, default_ks, greedy_accuracies, transition_rates
from thinktwice_pl.rollout import SamplingConfig
from thinktwice_pl.types import EvalBatch

log = logging.getLogger(__name__)
Split = Literal["val", "test"]


class Evaluation(Callback):
    """pass@k of the solve answers and of their refinements per benchmark, and greedy transition rates.

    The ``eval:`` section of the config; benchmarks are set on the data module (``data.val``, ``data.test``).

    Args:
        num_samples: n, answers sampled per problem (the paper: 64); pass@k is reported for k = 1, 2, 4, ... n.
        val_num_samples: n of validation (``thinktwice validate`` and validation during fit); None = num_samples;
            0 = no sampling, only the greedy answer and its greedy refinement per problem (greedy accuracy and
            transitions: the paper validates this way every 10 phases and keeps the best checkpoint by
            ``val/avg/solve/greedy_acc``).
        ks: the budgets k to report; None = 1, 2, 4, ... up to n, and n. A k above a split's n is left out there.
        temperature: sampling temperature of the answers.
        top_p: nucleus threshold of the answers.
        top_k: top-k of the answers (None = off).
        max_completion_length: most new tokens per answer and per refinement.
        refine_temperature: temperature of the refinements (0 = greedy, the paper).
        transitions: also generate one greedy answer and its greedy refinement per problem (``greedy_acc``,
            ``transition/*``).
        validate_before_training: during fit, validate the base model before the first phase (step 0), so curves
            and the rectify/fortify plot start there; not when resuming. Needs data.val.
        seed: base seed of the evaluation sampling (batch b of a run draws the same samples every time).
        records: also append one row per problem to ``<log dir>/eval_records.csv`` (`RECORD_COLUMNS`: its correct
            counts), for intervals over problems and paired comparisons of runs.
        remove_system_prompt: leave out the system turn that the chat template inserts into a chat without one
            (as ``rollout.remove_system_prompt`` does for training prompts). Off by default: the reference
            evaluation kept the template's system prompt even for runs trained without it.
    """

    def __init__(
        self,
        num_samples: int = 64,
        val_num_samples: int | None = None,
        ks: list[int] | None = None,
        temperature: float = 0.7,
        top_p: float = 0.8,
        top_k: int | None = 20,
        max_completion_length: int = 3000,
        refine_temperature: float = 0.0,
        transitions: bool = True,
        validate_before_training: bool = True,
        seed: int = 0,
        records: bool = False,
        remove_system_prompt: bool = False,
    ) -> None:
        super().__init__()
        if num_samples < 1:
            raise UserError(f"eval.num_samples={num_samples} must be at least 1")
        if val_num_samples is not None and val_num_samples < 0:
            raise UserError(f"eval.val_num_samples={val_num_samples} must be >= 0 (0 = greedy only) or unset")
        if val_num_samples == 0 and not transitions:
            raise UserError(
                "eval.val_num_samples=0 validates with the greedy pass only, which eval.transitions=false switches "
                "off: set eval.transitions=true or eval.val_num_samples >= 1"
            )
        bad = [k for k in (ks or []) if not 1 <= k <= num_samples]
        if bad:
            raise UserError(f"eval.ks={ks}: pass@k needs 1 <= k <= eval.num_samples={num_samples} (got {bad})")
        self.ks = list(ks) if ks else default_ks(num_samples)
        self._ks_given = bool(ks)
        self.num_samples = num_samples
        self.val_num_samples = num_samples if val_num_samples is None else val_num_samples
        self.validate_before_training = validate_before_training
        self.sampling = SamplingConfig(
            temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_completion_length
        )
        sampled_refine = refine_temperature > 0  # greedy refinements ignore top-p / top-k
        self.refine_sampling = SamplingConfig(
            temperature=refine_temperature,
            top_p=top_p if sampled_refine else 1.0,
            top_k=top_k if sampled_refine else None,
            max_new_tokens=max_completion_length,
        )
        self.transitions = transitions
        self.seed = seed
        self.records = records
        self.remove_system_prompt = remove_system_prompt
        self._started = 0.0
        self._split: Split = "val"
        self._pass: dict[str, tuple[PassAtK, PassAtK]] = {}  # benchmark -> (solve, refine)
        self._greedy: dict[str, Transitions] = {}  # benchmark -> greedy answer / greedy refinement outcomes
        self._truncated_prompts = self._refine_prompts = 0
        self._validated_at: int | None = None  # phase step of the last validation logged during fit (checkpointed)

    # ------------------------------------------------------------------------------ lifecycle

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validate the base model before the first phase (logged at step 0), and, when resuming, the validation the
        interrupted run owed (`_validate_if_owed`). Never without data.val."""
        if thinktwice_data(trainer, "Evaluation").cursor == 0:
            if self.validate_before_training:
                self._run_validation(trainer)
        else:
            self._validate_if_owed(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A run resumed after its last phase (it failed or was killed in its final validation) trains nothing and
        skips on_train_start: its owed validation runs here."""
        self._validate_if_owed(trainer)

    def _validate_if_owed(self, trainer: pl.Trainer) -> None:
        """Run the validation due after the phases completed so far when none was logged at that step: a run resumed
        from a checkpoint taken before or during that validation (Lightning's loop skips it on resume)."""
        data = thinktwice_data(trainer, "Evaluation")
        cursor, per_epoch = data.cursor, data.phase_batches_per_epoch
        if cursor > 0 and self._validated_at != cursor and validation_due(trainer, cursor, per_epoch):
            self._run_validation(trainer)

    def _run_validation(self, trainer: pl.Trainer) -> None:
        """The fit loop's own validation, run now; not without data.val."""
        if not thinktwice_data(trainer, "Evaluation").eval_sources["val"] or trainer.limit_val_batches == 0:
            return
        run_validation(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"validated_at": self._validated_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validated_at = state_dict.get("validated_at")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, "val")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.evaluate(trainer, pl_module, batch, batch_idx)

    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.evaluate(trainer, pl_module, batch, batch_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def num_samples_for(self, split: Split) -> int:
        """n of `split`: num_samples for test, val_num_samples for validation (0 = greedy pass only)."""
        return self.val_num_samples if split == "val" else self.num_samples

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: Split) -> None:
        rollout_callback(trainer).ready(trainer, pl_module)  # the engine and the grader (set up once)
        self._split = split
        self._pass, self._greedy = {}, {}
        self._truncated_prompts = self._refine_prompts = 0  # this rank's, in this evaluation
        self._started = time.perf_counter()

    # ------------------------------------------------------------------------------ one batch

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: EvalBatch, batch_idx: int) -> None:
        """Generate and grade the answers, refinements and greedy pair of every problem of `batch`."""
        if not isinstance(batch, EvalBatch):
            raise TypeError(f"expected an EvalBatch from ThinkTwiceDataModule, got {type(batch).__name__}")
        rollout, tokenizer = rollout_callback(trainer), pl_module.tokenizer
        n, problems = self.num_samples_for(self._split), batch.problems
        seed = phase_seed(self.seed, batch.index, pl_module.global_rank)
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=self.sampling.max_new_tokens)
        solve = rollout.prompts(problems, tokenizer, remove_system_prompt=self.remove_system_prompt)
        with rollout.awake() as engine:
            samples = engine.generate(solve.ids, n, replace(self.sampling, seed=seed)) if n else [[] for _ in problems]
            bases = [group[0] for group in engine.generate(solve.ids, 1, greedy)] if self.transitions else []  # [P]
            # one refinement of every sampled answer (problem-major), then of every greedy answer, as in training
            owners = [p for p, group in zip(problems, samples, strict=True) for _ in group] + problems[: len(bases)]
            reviewed = [c for group in samples for c in group] + bases
            refine = rollout.prompts(owners, tokenizer, [c.text for c in reviewed], self.remove_system_prompt)
            m = len(owners) - len(bases)  # refinements of sampled answers
            if self.refine_sampling.temperature == 0 or not m:  # one greedy call for both kinds of refinement
                refined = [group[0] for group in engine.generate(refine.ids, 1, greedy)]
            else:
                sampled = replace(self.refine_sampling, seed=seed + 1)
                refined = [group[0] for group in engine.generate(refine.ids[:m], 1, sampled)]
                refined += [group[0] for group in engine.generate(refine.ids[m:], 1, greedy)] if bases else []
        self._truncated_prompts += len(refine.truncated)
        self._refine_prompts += len(refine.ids)

        golds = [p.answer for p in owners]
        segments = {  # name -> (prompt texts, completions, gold answers)
            "answers": ([t for t in solve.texts for _ in range(n)], [c.text for c in reviewed[:m]], golds[:m]),
            "greedy": (solve.texts[: len(bases)], [c.text for c in bases], golds[m:]),
            "refined": (refine.texts[:m], [c.text for c in refined[:m]], golds[:m]),
            "greedy_refined": (refine.texts[m:], [c.text for c in refined[m:]], golds[m:]),
        }
        results = rollout.score(segments, f"{batch.benchmark} evaluation")
        right = {name: [r > 0.5 for r in result.rewards] for name, result in results.items()}
        keep = [i for i in range(len(problems)) if batch.counted[i]]
        if n:
            solve_metric, refine_metric = self._pass_metrics(batch.benchmark, n, pl_module)
            solve_metric.update([sum(right["answers"][i * n : (i + 1) * n]) for i in keep])
            refine_metric.update([sum(right["refined"][i * n : (i + 1) * n]) for i in keep])
        if bases:
            outcomes = self._greedy.setdefault(batch.benchmark, Transitions().to(pl_module.device))
            outcomes.update([right["greedy"][i] for i in keep], [right["greedy_refined"][i] for i in keep])
        if self.records:
            self._write_records(trainer, batch, n, keep, right)
        batch.evaluated = True

    def _write_records(
        self, trainer: pl.Trainer, batch: EvalBatch, n: int, keep: list[int], right: dict[str, list[bool]]
    ) -> None:
        """Appends a row per counted problem of `batch` to ``eval_records.csv`` (``eval_records.rank<r>.csv`` with
        several ranks) in the log directory; greedy columns are empty without ``eval.transitions``."""
        name = "eval_records.csv" if trainer.world_size == 1 else f"eval_records.rank{trainer.global_rank}.csv"
        path = Path(trainer.log_dir or trainer.default_root_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(RECORD_COLUMNS)
            for i in keep:
                greedy = [int(right["greedy"][i]), int(right["greedy_refined"][i])] if right["greedy"] else ["", ""]
                solved, refined = sum(right["answers"][i * n : (i + 1) * n]), sum(right["refined"][i * n : (i + 1) * n])
                row = [self._split, phase_step(trainer), batch.benchmark, batch.problems[i].id, n, solved, refined]
                writer.writerow([*row, *greedy])

    def _pass_metrics(self, name: str, n: int, pl_module: pl.LightningModule) -> tuple[PassAtK, PassAtK]:
        if name not in self._pass:
            ks = [k for k in self.ks if k <= n] if self._ks_given else default_ks(n)
            self._pass[name] = (PassAtK(n, ks).to(pl_module.device), PassAtK(n, ks).to(pl_module.device))
        return self._pass[name]

    # ------------------------------------------------------------------------------ logging

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: Split) -> None:
        if not self._pass and not self._greedy:  # no benchmarks configured (fit without data.val)
            return
        if self._truncated_prompts:
            log.warning(
                "%s evaluation, rank %d: %d of %d refine prompts were longer than rollout.max_prompt_length=%s "
                "and kept only their last tokens",
                split,
                trainer.global_rank,
                self._truncated_prompts,
                self._refine_prompts,
                rollout_callback(trainer).max_prompt_length,
            )
        metrics = eval_metrics(self._pass, self._greedy, split)
        metrics[f"perf/{split}_s"] = time.perf_counter() - self._started  # wall time of the whole evaluation
        # During fit the loggers get one row at the phase step, like the training rows (Lightning would write it
        # at the optimizer step); validate/test go through Lightning's logging, results table and return value.
        fitting = trainer.state.fn == "fit"
        for key, value in metrics.items():
            pl_module.log(key, value, logger=not fitting, on_step=False, on_epoch=True)
        if fitting:
            self._validated_at = phase_step(trainer)
        if fitting and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=phase_step(trainer))
                logger.save()


RECORD_COLUMNS = (
    "split",
    "step",
    "benchmark",
    "problem_id",
    "n",
    "solve_correct",
    "refine_correct",
    "greedy_correct",
    "greedy_refine_correct",
)
"""Columns of ``eval_records.csv``: correct answers among the n samples and among their refinements, and whether the
greedy answer and its greedy refinement are correct (1/0)."""


def eval_metrics(
    pass_metrics: dict[str, tuple[PassAtK, PassAtK]], greedy: dict[str, Transitions], split: Split
) -> dict[str, float]:
    """The documented keys: ``<split>/<bench>/{solve,refine}/{pass@<k>,greedy_acc}``, their macro averages
    ``<split>/avg/...`` and the pooled ``<split>/transition/*``; computes (so reduces across ranks) every metric."""
    out: dict[str, float] = {}
    per_key: dict[str, list[float]] = {}  # "<phase>/<metric>" -> one value per benchmark
    for bench, (solve, refine) in pass_metrics.items():
        for phase, metric in (("solve", solve), ("refine", refine)):
            for k, value in metric.compute().items():
                out[f"{split}/{bench}/{phase}/pass@{k}"] = value
                per_key.setdefault(f"{phase}/pass@{k}", []).append(value)
    pooled: Counter[str] = Counter()
    for bench, outcomes in greedy.items():
        with outcomes.sync_context():  # every rank's problems
            counts = outcomes.totals()
        pooled.update(counts)
        for phase, value in zip(("solve", "refine"), greedy_accuracies(counts), strict=True):
            out[f"{split}/{bench}/{phase}/greedy_acc"] = value
            per_key.setdefault(f"{phase}/greedy_acc", []).append(value)
    for key, values in per_key.items():
        out[f"{split}/avg/{key}"] = sum(values) / len(values)
    if greedy:  # the transition rates pool the problems of all benchmarks
        out.update({f"{split}/transition/{name}": v for name, v in transition_rates(dict(pooled)).items()})
    return out


def rollout_callback(trainer: pl.Trainer) -> RolloutCallback:
    """The trainer's RolloutCallback: evaluation samples with its engine, prompt texts and grader."""
    found = [c for c in trainer.callbacks if isinstance(c, RolloutCallback)]  # type: ignore[attr-defined]
    if not found:
        raise RuntimeError(
            "evaluation needs the RolloutCallback (its engine, prompts and grader): use the thinktwice CLI, or add "
            "thinktwice_pl.callbacks.RolloutCallback to trainer.callbacks"
        )
    return found[0]


def phase_step(trainer: pl.Trainer) -> int:
    """The step at which evaluation rows are logged: during fit the number of phases completed (0 for the base
    model; the training row at step i describes rollouts sampled after i phases, so both measure the same policy),
    otherwise the trainer's global step."""
    if trainer.state.fn == "fit":
        return thinktwice_data(trainer, "the evaluation rows' step").cursor
    return trainer.global_step
