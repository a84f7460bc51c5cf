"""Evaluation: pass@k before and after self-refinement, and the transition rates (METHOD.md section 6).

For every problem of a validation/test benchmark:

1. n answers are sampled with the evaluation settings (temperature 0.7, top-p 0.8, top-k 20, 3000
   tokens by default) -> ``<split>/<benchmark>/solve/pass@<k>``;
2. every answer is refined once with the review instruction (greedy by default), in the same
   three-turn chat as training -> ``<split>/<benchmark>/refine/pass@<k>``;
3. one greedy answer and its greedy refinement -> ``<split>/<benchmark>/{solve,refine}/greedy_acc`` and
   ``<split>/transition/{fix_wrong, damage_correct, keep_right, stay_wrong}`` (over all benchmarks);
4. with ``eval.refine_rounds`` R >= 2, rounds 2..R refine the previous round's answer of every sample and of the
   greedy chain with the same prompt and settings -> ``refine<r>/{pass@<k>,greedy_acc}``, ``transition<r>/*``
   (round r against round r - 1), and the compute-matched ``matched<r>/pass@<k>``: the first answers'
   pass@((r + 1)k), as many generations as pass@k after r refinements.

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
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from thinktwice_pl.callbacks.rollout import RolloutCallback, phase_seed
from thinktwice_pl.data import thinktwice_data
from thinktwice_pl.errors import UserError
from thinktwice_pl.lightning_shims import run_validation, validation_due
from thinktwice_pl.metrics import PassAtK, Transitions, default_ks, eval_metrics, matched_ks, record_columns
from thinktwice_pl.rollout import RolloutEngine, SamplingConfig
from thinktwice_pl.types import Completion, EvalBatch

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
        refine_rounds: R, refinements in a row (1 = the paper); round r >= 2 reviews round r - 1's answer of each
            sample and of the greedy chain, with the same review prompt and refine settings.
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
        refine_rounds: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(refine_rounds, bool) or not isinstance(refine_rounds, int) or refine_rounds < 1:
            raise UserError(
                f"eval.refine_rounds={refine_rounds!r} must be an integer >= 1 (1 = one refinement of every answer, "
                "the paper; 2 = refine that refinement once more, ...)"
            )
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
        self.refine_rounds = refine_rounds
        self._started = 0.0
        self._split: Split = "val"
        self._pass: dict[str, list[PassAtK]] = {}  # benchmark -> pass@k of round 0 (solve), 1, ... R
        self._matched: dict[str, list[PassAtK]] = {}  # benchmark -> solve's pass@((r+1)k) of round 1..R (R >= 2)
        self._greedy: dict[str, list[Transitions]] = {}  # benchmark -> greedy outcomes into round 1..R
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
        self._pass, self._matched, self._greedy = {}, {}, {}
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
            # every sampled answer (problem-major), then every greedy answer, refined R times in a row
            owners = [p for p, group in zip(problems, samples, strict=True) for _ in group] + problems[: len(bases)]
            m = len(owners) - len(bases)  # refinements of sampled answers
            chain = [[c for group in samples for c in group] + bases]  # round -> completions
            prompt_texts = [[t for t in solve.texts for _ in range(n)] + solve.texts[: len(bases)]]
            for round_ in range(1, self.refine_rounds + 1):
                refine = rollout.prompts(owners, tokenizer, [c.text for c in chain[-1]], self.remove_system_prompt)
                chain.append(self._refine(engine, refine.ids, m, seed + round_, greedy))
                prompt_texts.append(refine.texts)
                self._truncated_prompts += len(refine.truncated)
                self._refine_prompts += len(refine.ids)

        golds = [p.answer for p in owners]
        segments = {}  # name -> (prompt texts, completions, gold answers)
        for round_, (texts, completions) in enumerate(zip(prompt_texts, chain, strict=True)):
            sampled, greedy_name = segment_names(round_)
            segments[sampled] = (texts[:m], [c.text for c in completions[:m]], golds[:m])
            segments[greedy_name] = (texts[m:], [c.text for c in completions[m:]], golds[m:])
        results = rollout.score(segments, f"{batch.benchmark} evaluation")
        right = {name: [r > 0.5 for r in result.rewards] for name, result in results.items()}
        keep = [i for i in range(len(problems)) if batch.counted[i]]
        counts = [  # round -> correct samples of each counted problem
            [sum(right[segment_names(r)[0]][i * n : (i + 1) * n]) for i in keep] for r in range(len(chain))
        ]
        if n:
            for metric, correct in zip(self._pass_metrics(batch.benchmark, n, pl_module), counts, strict=True):
                metric.update(correct)
            for metric in self._matched.get(batch.benchmark, []):
                metric.update(counts[0])
        if bases:
            rounds = self._greedy.setdefault(
                batch.benchmark, [Transitions().to(pl_module.device) for _ in range(self.refine_rounds)]
            )
            for round_, outcomes in enumerate(rounds, start=1):
                before, after = right[segment_names(round_ - 1)[1]], right[segment_names(round_)[1]]
                outcomes.update([before[i] for i in keep], [after[i] for i in keep])
        if self.records:
            self._write_records(trainer, batch, n, keep, counts, right)
        batch.evaluated = True

    def _refine(
        self, engine: RolloutEngine, ids: list[list[int]], m: int, seed: int, greedy: SamplingConfig
    ) -> list[Completion]:
        """One refinement of each prompt: the first `m` (reviewing sampled answers) with the refine settings and
        `seed`, the rest (the greedy chain) greedily; one greedy call for all when the refine settings are greedy."""
        if self.refine_sampling.temperature == 0 or not m:
            return [group[0] for group in engine.generate(ids, 1, greedy)]
        refined = [group[0] for group in engine.generate(ids[:m], 1, replace(self.refine_sampling, seed=seed))]
        return refined + ([group[0] for group in engine.generate(ids[m:], 1, greedy)] if len(ids) > m else [])

    def _write_records(
        self,
        trainer: pl.Trainer,
        batch: EvalBatch,
        n: int,
        keep: list[int],
        counts: list[list[int]],
        right: dict[str, list[bool]],
    ) -> None:
        """Appends a row per counted problem of `batch` to ``eval_records.csv`` (``eval_records.rank<r>.csv`` with
        several ranks) in the log directory; greedy columns are empty without ``eval.transitions``. Refuses a file
        whose header differs (written with another ``eval.refine_rounds``) rather than mixing rows."""
        name = "eval_records.csv" if trainer.world_size == 1 else f"eval_records.rank{trainer.global_rank}.csv"
        path = Path(trainer.log_dir or trainer.default_root_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = record_columns_for(self.refine_rounds)
        new = not path.exists()
        if not new:
            with path.open(newline="") as f:
                header = tuple(next(csv.reader(f), ()))
            if header != columns:
                raise UserError(
                    f"{path} has the columns {', '.join(header)} but eval.refine_rounds={self.refine_rounds} writes "
                    f"{', '.join(columns)}: evaluate into a new log directory (or keep eval.refine_rounds) so the "
                    "existing records stay as they are"
                )
        greedy_names = [segment_names(r)[1] for r in range(self.refine_rounds + 1)]
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(columns)
            for j, i in enumerate(keep):
                greedy = [int(right[g][i]) if right[g] else "" for g in greedy_names]
                row = [self._split, phase_step(trainer), batch.benchmark, batch.problems[i].id, n]
                row += [counts[0][j], counts[1][j], *greedy[:2]]  # the paper's columns (RECORD_COLUMNS)
                for round_ in range(2, self.refine_rounds + 1):
                    row += [counts[round_][j], greedy[round_]]
                writer.writerow(row)

    def _pass_metrics(self, name: str, n: int, pl_module: pl.LightningModule) -> list[PassAtK]:
        """pass@k of rounds 0..R of benchmark `name` (created on its first batch, with the compute-matched metrics
        of rounds 1..R when R >= 2)."""
        if name not in self._pass:
            ks = [k for k in self.ks if k <= n] if self._ks_given else default_ks(n)
            rounds = range(self.refine_rounds + 1)
            self._pass[name] = [PassAtK(n, ks).to(pl_module.device) for _ in rounds]
            if self.refine_rounds > 1:
                self._matched[name] = [
                    PassAtK(n, [(r + 1) * k for k in matched_ks(ks, r, n)]).to(pl_module.device) for r in rounds[1:]
                ]
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
        metrics = eval_metrics(self._pass, self._greedy, split, self._matched)
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


def record_columns_for(refine_rounds: int) -> tuple[str, ...]:
    """The columns of ``eval_records.csv`` with R refinement rounds: `RECORD_COLUMNS`, then for each round r >= 2
    ``refine<r>_correct`` and ``greedy_refine<r>_correct``."""
    return RECORD_COLUMNS + tuple(c for r in range(2, refine_rounds + 1) for c in record_columns(r))


def segment_names(round_: int) -> tuple[str, str]:
    """The grading segments of round `round_`: (its sampled chain, its greedy chain)."""
    if round_ == 0:
        return "answers", "greedy"
    suffix = "" if round_ == 1 else str(round_)
    return f"refined{suffix}", f"greedy_refined{suffix}"


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
