"""Phase-tagged batches out: the ThinkTwice data module.

ThinkTwice (METHOD.md section 1) trains every batch of problems twice: a *solve* phase (plain GRPO)
and then a *refine* phase in which the policy reviews its own solve answers (the *bases*).

- `ThinkTwiceDataModule`: serves problem batch ``p`` as ``solve`` then ``refine`` (solve only when
  ``refine=False``: the GRPO baseline), caches the solve rollouts that the refine phase needs, and
  serves the named validation and test benchmarks.

Problems come from `thinktwice_pl.sources` (files, hub datasets, presets) and `thinktwice_pl.procedural`; the
bases of the refine prompts are chosen by `thinktwice_pl.bases.select_bases`.

Resume is exact: the module counts phase batches *completed* (`phase_done`, called by the rollout
callback), not fetched (Lightning prefetches one batch ahead), and every iteration starts at that
cursor. The cursor and the rollout cache travel in the checkpoint through `state_dict`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset

from thinktwice_pl.bases import BaseSelection, select_bases
from thinktwice_pl.batching import rank_slice
from thinktwice_pl.errors import UserError
from thinktwice_pl.procedural import procedural_problem, procedural_problems, text_side
from thinktwice_pl.sources import BENCHMARKS, PRESETS, ProblemSource, load_problems, resolve_source, write_parquet
from thinktwice_pl.types import EvalBatch, PhaseBatch, Problem, Rollout

__all__ = [  # the problem sources are re-exported: configs and user code import them from here
    "BENCHMARKS",
    "PRESETS",
    "ProblemSource",
    "ThinkTwiceDataModule",
    "eval_batches",
    "load_problems",
    "procedural_problem",
    "procedural_problems",
    "rank_slice",
    "resolve_source",
    "select_bases",
    "text_side",
    "thinktwice_data",
    "write_parquet",
]

_STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------- data module


class ThinkTwiceDataModule(LightningDataModule):
    """Serves each problem batch twice, solve then refine, and keeps the solve rollouts for the refine phase.

    Phase batch ``i`` is fully determined by ``i``: pair ``p = i // 2`` (``i`` itself with ``refine=False``),
    epoch ``p // pairs_per_epoch``, the problems at slot ``p % pairs_per_epoch`` of that epoch's order. The
    rollout callback calls `bases_for` before a refine batch and `phase_done` after every batch.
    """

    def __init__(
        self,
        train: ProblemSource | None = None,
        problems_per_batch: int = 32,
        refine: bool = True,
        refine_selection: BaseSelection = "uniform",
        shuffle: bool = True,
        seed: int = 0,
        val: dict[str, ProblemSource] | None = None,
        test: dict[str, ProblemSource] | None = None,
        eval_problems_per_batch: int = 8,
    ) -> None:
        """Creates the data module; problems are loaded in `setup`.

        Args:
            train: where the training problems come from; unset: generated arithmetic (``ProblemSource()``).
            problems_per_batch: problems per batch (B); each phase samples B * num_generations completions.
                An epoch is floor(num_problems / B) batches; the remainder is left out of that epoch.
            refine: serve every problem batch a second time for the refine phase; false gives the GRPO baseline.
            refine_selection: which B solve answers of the batch become the bases of the B refine prompts:
                ``uniform`` (the paper: one sample of each problem, right or wrong), ``wrong_first`` or ``balanced``
                (ablations that pick for the batch as a whole, as the reference code does; see `select_bases`).
            shuffle: a fresh problem order each epoch, seeded by (seed, epoch); false keeps the source order.
            seed: seed of the epoch orders and of the base selection.
            val: named validation benchmarks (``name: source``), evaluated during fit and by ``thinktwice validate``;
                e.g. ``{aime: {preset: aime}}`` or ``{arith: {path: procedural, num_problems: 16}}``.
            test: named test benchmarks, evaluated by ``thinktwice test``.
            eval_problems_per_batch: problems per validation/test batch (each gets eval.num_samples samples).
        """
        super().__init__()
        if problems_per_batch < 1:
            raise UserError(f"data.problems_per_batch={problems_per_batch} must be at least 1")
        if refine_selection not in ("uniform", "wrong_first", "balanced"):
            raise UserError(f"data.refine_selection={refine_selection!r}; use uniform, wrong_first or balanced")
        if isinstance(train, dict):  # hyper-parameters read back from a checkpoint (load_from_checkpoint)
            train = ProblemSource(**train)
        if eval_problems_per_batch < 1:
            raise UserError(f"data.eval_problems_per_batch={eval_problems_per_batch} must be at least 1")
        self.train_source = train if train is not None else ProblemSource()
        self.eval_sources = {"val": _named_sources(val, "data.val"), "test": _named_sources(test, "data.test")}
        self.eval_problems_per_batch = eval_problems_per_batch
        self.save_hyperparameters()
        # Plain python in checkpoints: torch.load(weights_only=True), Lightning's default on resume, refuses classes.
        self.hparams["train"] = dataclasses.asdict(self.train_source)
        for split, sources in self.eval_sources.items():
            self.hparams[split] = {name: dataclasses.asdict(source) for name, source in sources.items()} or None
        self._eval_problems: dict[str, dict[str, list[Problem]]] = {}
        self.problems_per_batch = problems_per_batch
        self.refine = refine
        self.refine_selection: BaseSelection = refine_selection
        self.shuffle = shuffle
        self.seed = seed
        self._problems: list[Problem] | None = None
        self._cursor = 0  # phase batches completed (phase_done), not fetched: Lightning prefetches one ahead
        self._cache: dict[int, _Solved] = {}  # pair -> its solve phase's trained groups
        self._pending_state: dict[str, Any] | None = None  # load_state_dict before setup
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, problem order) of the last epoch served

    # --- problems and layout

    def setup(self, stage: str | None = None) -> None:
        """Loads the training problems once (later calls do nothing); the benchmarks when first needed.

        A fit without ``data.val`` runs no validation loop (``trainer.limit_val_batches`` is set to 0), instead of
        one over an empty loader."""
        trainer = getattr(self, "trainer", None)
        if stage == "fit" and trainer is not None and not self.eval_sources["val"]:
            trainer.limit_val_batches = 0
        if self._problems is not None or stage not in (None, "fit"):
            return
        problems = load_problems(self.train_source)
        n, size = len(problems), self.problems_per_batch
        if n < size:
            raise UserError(
                f"data.train ({self.train_source.path}) gives {n} problems, fewer than data.problems_per_batch="
                f"{size}; lower data.problems_per_batch or give more problems (data.train.num_problems, .limit)"
            )
        if n % size:
            rank_zero_info(
                f"{n % size} of {n} training problems do not fill a batch of {size} and sit out each epoch "
                f"({'a different subset each epoch' if self.shuffle else 'always the last ones'})"
            )
        self._problems = problems
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._restore(state)

    @property
    def problems(self) -> list[Problem]:
        """The training problems in source order."""
        if self._problems is None:
            raise RuntimeError("ThinkTwiceDataModule has no problems yet; call setup('fit') first")
        return self._problems

    @property
    def cursor(self) -> int:
        """Number of phase batches completed; the next training iteration starts here."""
        return self._cursor

    @property
    def phase_batches_per_epoch(self) -> int:
        """Phase batches in one epoch: problem batches times phases (2 with refine, else 1)."""
        return len(self.problems) // self.problems_per_batch * (2 if self.refine else 1)

    def phase_batch(self, index: int) -> PhaseBatch:
        """Builds phase batch `index` (counted from the start of training)."""
        pair, step = divmod(index, 2) if self.refine else (index, 0)
        epoch, slot = divmod(pair, len(self.problems) // self.problems_per_batch)
        if self._order[0] != epoch:
            order = list(range(len(self.problems)))
            if self.shuffle:
                random.Random(f"thinktwice-order-{self.seed}-{epoch}").shuffle(order)
            self._order = (epoch, order)
        chosen = self._order[1][slot * self.problems_per_batch : (slot + 1) * self.problems_per_batch]
        return PhaseBatch(
            phase="solve" if step == 0 else "refine",
            problems=[self.problems[i] for i in chosen],
            index=index,
            pair=pair,
            epoch=epoch,
        )

    def train_dataloader(self) -> DataLoader[PhaseBatch]:
        """Phase batches from the cursor to the end of the cursor's epoch (one Lightning epoch)."""
        self.setup("fit")
        return DataLoader(_PhaseBatches(self), batch_size=None, collate_fn=_identity, num_workers=0)

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """Returns phase and evaluation batches unchanged: they hold no tensors (callbacks build them on device).

        Lightning's default would deep-copy every problem record of the batch on each step.
        """
        if isinstance(batch, PhaseBatch | EvalBatch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # --- validation and test benchmarks

    def eval_problems(self, split: Literal["val", "test"]) -> dict[str, list[Problem]]:
        """The problems of each named benchmark of `split` (loaded once, validated like the training problems)."""
        if split not in self._eval_problems:
            self._eval_problems[split] = {
                name: load_problems(source, flag_prefix=f"data.{split}.{name}")
                for name, source in self.eval_sources[split].items()
            }
        return self._eval_problems[split]

    def val_dataloader(self) -> DataLoader[EvalBatch]:
        """Batches of the ``data.val`` benchmarks, one benchmark after the other; this rank's share only."""
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader[EvalBatch]:
        """Batches of the ``data.test`` benchmarks; this rank's share only."""
        return self._eval_dataloader("test")

    def _eval_dataloader(self, split: Literal["val", "test"]) -> DataLoader[EvalBatch]:
        trainer = getattr(self, "trainer", None)
        fitting = trainer is not None and trainer.state.fn == "fit"
        if not self.eval_sources[split] and not fitting:
            raise UserError(
                f"no {split} benchmarks are configured: set data.{split} (e.g. {{aime: {{preset: aime}}}} or "
                f"{{arith: {{path: procedural, num_problems: 32}}}})"
            )
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batches = eval_batches(self.eval_problems(split), self.eval_problems_per_batch, rank, world)
        return DataLoader(batches, batch_size=None, collate_fn=_identity, num_workers=0, shuffle=False)  # type: ignore[arg-type]

    # --- the rollout cache

    def phase_done(self, batch: PhaseBatch) -> None:
        """Marks `batch` completed; call once per training batch, in order, from ``on_train_batch_end``.

        After a solve batch (with refine on) its rollouts are cached for the refine batch of the same pair.
        """
        if batch.index != self._cursor:
            raise RuntimeError(
                f"phase_done got phase batch {batch.index} but the next batch to complete is {self._cursor}; "
                "call it exactly once per training batch, in order, from on_train_batch_end"
            )
        if batch.phase == "solve" and self.refine:
            if batch.rollouts is None or batch.rollouts.num_groups != len(batch.problems):
                got = "no rollouts" if batch.rollouts is None else f"{batch.rollouts.num_groups} groups"
                raise RuntimeError(
                    f"solve batch {batch.index} (pair {batch.pair}) finished with {got} for {len(batch.problems)} "
                    "problems; the rollout callback must set batch.rollouts (one group per problem) before phase_done"
                )
            # Only the records: tensors built on the batch are not kept. Older pairs are never refined again.
            rollouts = batch.rollouts
            self._cache = {batch.pair: _Solved(rollouts.group_size, list(rollouts.rollouts), list(batch.problems))}
        elif batch.phase == "refine":
            self._cache.pop(batch.pair, None)  # no longer needed: keeps checkpoints after a refine batch small
        self._cursor += 1

    def solved_problems(self, batch: PhaseBatch) -> list[Problem]:
        """The problems the solve phase of refine `batch`'s pair trained, in group order: the batch's own problems, or
        with dynamic sampling the problems of the informative groups it kept (some may be extra draws)."""
        return list(self._solved(batch).problems)

    def bases_for(self, batch: PhaseBatch) -> list[Rollout]:
        """The B solve answers to review in refine `batch` (`select_bases` with ``refine_selection``).

        ``bases[i].problem_id`` is the problem of refine prompt i: with ``uniform`` nearly always the pair's solved
        problems in order, with ``wrong_first`` / ``balanced`` a problem may get several bases and another none. The
        choice is seeded by (seed, pair), so it is the same after a resume.
        """
        groups = self._solved_groups(batch)
        return select_bases(groups, self.refine_selection, random.Random(f"thinktwice-bases-{self.seed}-{batch.pair}"))

    def extra_bases(self, batch: PhaseBatch, round_: int, count: int, used: list[Rollout]) -> list[Rollout]:
        """Dynamic sampling in refine `batch`: up to `count` more bases for generation round `round_` (1, 2, ...), drawn
        uniformly from the pair's cached solve answers not reviewed yet (`used`), seeded by (seed, pair, round). A
        refine group is the G refinements of one base, so the extra groups review other samples of the same
        problems; fewer than `count` (or none) once every cached answer has been reviewed."""
        taken = {id(r) for r in used}
        pool = [r for group in self._solved_groups(batch) for r in group if id(r) not in taken]
        rng = random.Random(f"thinktwice-extra-bases-{self.seed}-{batch.pair}-{round_}")
        return rng.sample(pool, min(count, len(pool)))

    def extra_problems(self, batch: PhaseBatch, round_: int, count: int, used: list[Problem]) -> list[Problem]:
        """Dynamic sampling in solve `batch`: up to `count` more problems for generation round `round_` (1, 2, ...),
        drawn uniformly from the training problems not in this phase yet (`used`), seeded by (seed, pair, round). The
        epoch layout does not change: every problem is still a batch problem once per epoch."""
        taken = {p.id for p in used}
        pool = [p for p in self.problems if p.id not in taken]
        rng = random.Random(f"thinktwice-extra-problems-{self.seed}-{batch.pair}-{round_}")
        return rng.sample(pool, min(count, len(pool)))

    def _solved(self, batch: PhaseBatch) -> _Solved:
        if batch.phase != "refine":
            raise ValueError(f"phase batch {batch.index} is a {batch.phase} batch; only refine batches review answers")
        solved = self._cache.get(batch.pair)
        if solved is None:
            raise RuntimeError(
                f"refine batch for pair {batch.pair} but no cached solve rollouts: the solve batch of that pair "
                f"must end with phase_done(batch) and batch.rollouts set (cached pairs: {sorted(self._cache)})"
            )
        return solved

    def _solved_groups(self, batch: PhaseBatch) -> list[list[Rollout]]:
        solved = self._solved(batch)
        size, rollouts = solved.group_size, solved.rollouts
        groups = [rollouts[start : start + size] for start in range(0, len(rollouts), size)]
        expected = [p.id for p in solved.problems]
        if [{r.problem_id for r in group} for group in groups] != [{i} for i in expected]:
            raise RuntimeError(
                f"cached solve rollouts of pair {batch.pair} do not match its problems {expected[:4]}...: "
                "they must be group-major, one group per problem, in batch order"
            )
        return groups

    # --- checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Cursor, cached solve rollouts (plain python) and a fingerprint of the problems, for exact resume."""
        if self._problems is None:
            return dict(self._pending_state or {})
        return {
            "version": _STATE_VERSION,
            "cursor": self._cursor,
            "fingerprint": _fingerprint(self._problems),
            "layout": self._layout(),
            "cache": [
                {
                    "pair": pair,
                    "group_size": solved.group_size,
                    "rollouts": [dataclasses.asdict(r) for r in solved.rollouts],
                    "problems": [dataclasses.asdict(p) for p in solved.problems],
                }
                for pair, solved in self._cache.items()
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores `state_dict`; checked against the problems once they are loaded."""
        if self._problems is None:
            self._pending_state = dict(state_dict)
        else:
            self._restore(state_dict)

    def _layout(self) -> dict[str, Any]:
        return {
            "problems_per_batch": self.problems_per_batch,
            "refine": self.refine,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise UserError(f"data module state version {state.get('version')!r} is not {_STATE_VERSION}")
        ours, theirs = _fingerprint(self.problems), state["fingerprint"]
        if ours != theirs:
            raise UserError(
                f"the checkpoint was trained on {theirs['count']} problems (ids sha256 {theirs['ids_sha256'][:12]}) "
                f"but data.train ({self.train_source.path}) now gives {ours['count']} (ids sha256 "
                f"{ours['ids_sha256'][:12]}); resume with the same data.train settings, or start a fresh run"
            )
        changed = [
            f"data.{k}={v!r} (checkpoint: {state['layout'][k]!r})"
            for k, v in self._layout().items()
            if state["layout"].get(k) != v
        ]
        if changed:
            raise UserError(
                f"the checkpoint's batches were laid out differently: {', '.join(changed)}; "
                "set them as in the checkpoint to resume it, or start a fresh run (without --ckpt_path)"
            )
        self._cursor = int(state["cursor"])
        self._cache = {
            int(entry["pair"]): _Solved(
                int(entry["group_size"]),
                [Rollout(**r) for r in entry["rollouts"]],
                self._problems_of(entry),
            )
            for entry in state["cache"]
        }

    def _problems_of(self, entry: dict[str, Any]) -> list[Problem]:
        """The solved problems of a cache entry; an entry without them (an older checkpoint's) solved its pair's own
        problems."""
        if "problems" in entry:
            return [Problem(**p) for p in entry["problems"]]
        return self.phase_batch(2 * int(entry["pair"])).problems


@dataclass
class _Solved:
    """A solve phase's trained groups, kept for the refine phase of its pair: `rollouts` group-major, one group of
    `group_size` per problem of `problems`."""

    group_size: int
    rollouts: list[Rollout]
    problems: list[Problem]


def thinktwice_data(trainer: Any, user: str) -> ThinkTwiceDataModule:
    """The trainer's `ThinkTwiceDataModule`, for the callbacks that read its position (`cursor`: phase batches
    completed) or its refine cache; `user` names the caller in the error raised when the trainer has another data
    module or none."""
    datamodule = getattr(trainer, "datamodule", None)
    if not isinstance(datamodule, ThinkTwiceDataModule):
        got = "none" if datamodule is None else type(datamodule).__name__
        raise TypeError(f"{user} needs the ThinkTwiceDataModule (data:) to serve phase batches; the trainer has {got}")
    return datamodule


class _PhaseBatches(IterableDataset[PhaseBatch]):
    """One Lightning epoch of phase batches: from the data module's cursor, read at iter() time, to its epoch's end.

    When the cursor sits exactly on an epoch boundary this is the whole next epoch. No ``__len__``: after a
    mid-epoch resume the epoch is shorter.
    """

    def __init__(self, datamodule: ThinkTwiceDataModule) -> None:
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[PhaseBatch]:
        dm = self.datamodule
        start, per_epoch = dm.cursor, dm.phase_batches_per_epoch
        end = (start // per_epoch + 1) * per_epoch
        return (dm.phase_batch(i) for i in range(start, end))  # a generator expression: `start` is read now


def _identity(batch: Any) -> Any:
    return batch


def _named_sources(sources: dict[str, Any] | None, flag: str) -> dict[str, ProblemSource]:
    """``{name: ProblemSource}`` from the config (dicts read back from a checkpoint become ProblemSources)."""
    out: dict[str, ProblemSource] = {}
    for name, source in (sources or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise UserError(
                f"{flag}: benchmark name {name!r} must be letters, digits, '_', '-', '.' (it names metrics)"
            )
        if name in ("avg", "transition"):
            raise UserError(f"{flag}.{name}: the names 'avg' and 'transition' are taken by the summary metrics")
        out[str(name)] = ProblemSource(**source) if isinstance(source, dict) else source
    return out


def eval_batches(
    benchmarks: dict[str, list[Problem]], per_batch: int, rank: int = 0, world: int = 1
) -> list[EvalBatch]:
    """This rank's evaluation batches: problem i of a benchmark goes to rank i % world; ranks that get fewer
    problems are padded with repeats (``counted=False``) so that every rank runs the same number of batches."""
    batches: list[EvalBatch] = []
    for name, problems in benchmarks.items():
        share = problems[rank::world]
        counted = [True] * len(share)
        per_rank = -(-len(problems) // world)  # ceil
        while len(share) < per_rank:  # only when len(problems) % world != 0
            share.append(problems[0])
            counted.append(False)
        for start in range(0, len(share), per_batch):
            batches.append(
                EvalBatch(name, share[start : start + per_batch], len(batches), counted[start : start + per_batch])
            )
    return batches


def _fingerprint(problems: list[Problem]) -> dict[str, Any]:
    ids = "\n".join(p.id for p in problems).encode()
    return {"count": len(problems), "ids_sha256": hashlib.sha256(ids).hexdigest()}
