"""ThinkTwiceModule pieces on the tiny model: log-probs under padding, micro-batched gradients, refine signals."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from grad_helpers import accumulate_plain_gradients

from thinktwice_pl.batching import plan_phase
from thinktwice_pl.metrics import refine_signals
from thinktwice_pl.module import ThinkTwiceModule
from thinktwice_pl.parallel import check_precision
from thinktwice_pl.types import Rollout


def _rollout(
    prompt: list[int], completion: list[int], reward: float = 0.0, base_correct: bool | None = None
) -> Rollout:
    return Rollout(problem_id="p", phase="refine" if base_correct is not None else "solve", prompt_ids=prompt,
                   completion_ids=completion, completion_text="", finish_reason="stop", reward=reward,
                   base_correct=base_correct)  # fmt: skip


def test_padded_micro_batch_logprobs_equal_unpadded_forward(tiny_model_dir: Path) -> None:
    module = ThinkTwiceModule(
        model_name_or_path=str(tiny_model_dir), problems_per_batch=1, mini_batch_problems=1, num_generations=2
    )
    module.configure_model()
    torch.manual_seed(0)
    rollouts = [  # different prompt and completion lengths: left and right padding both in play
        _rollout(torch.randint(5, 500, (7,)).tolist(), torch.randint(5, 500, (5,)).tolist()),
        _rollout(torch.randint(5, 500, (3,)).tolist(), torch.randint(5, 500, (9,)).tolist()),
        _rollout(torch.randint(5, 500, (11,)).tolist(), torch.randint(5, 500, (1,)).tolist()),
    ]
    logprobs, entropy, mask = module._logprobs(rollouts, [0, 1, 2], grad=False)
    assert mask.sum(1).tolist() == [5, 9, 1]
    for row, r in enumerate(rollouts):
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            logits = module.policy(ids).logits[0, len(r.prompt_ids) - 1 : -1]  # [C, V] predicting the completion
        expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(r.completion_ids)[:, None])[:, 0]
        torch.testing.assert_close(logprobs[row, : len(r.completion_ids)], expected, atol=1e-5, rtol=1e-5)
    assert torch.all(entropy == 0)  # entropy is only computed on the training (with_grad) path


@pytest.mark.parametrize(("checkpointing", "tied"), [(False, False), (True, False), (False, True), (True, True)])
def test_shared_prompt_forward_gives_the_log_probs_and_gradients_of_the_joint_forward(
    tiny_model_dir: Path, tmp_path: Path, checkpointing: bool, tied: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows that share a prompt (a group's samples): each distinct prompt runs once and its KV cache is gathered to
    its rows. Log-probs and the gradient of a loss over them equal those of one forward over prompt + completion
    per row, with and without gradient checkpointing (whose backward runs each layer's forward again), with tied or
    separate embeddings, and transformers does not warn about the cache. The gradients also equal plain HF forwards'
    (the gradient leaves change where the gradients are summed, not what they are)."""
    from thinktwice_pl.batching import collate
    from thinktwice_pl.builtin_models import build_tiny_model
    from thinktwice_pl.models import completion_logprobs, load_causal_lm

    path = build_tiny_model(tmp_path / "tied", tie_word_embeddings=True) if tied else tiny_model_dir
    model = load_causal_lm(str(path), gradient_checkpointing=checkpointing)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    torch.manual_seed(0)
    prompts = [torch.randint(5, 500, (n,)).tolist() for n in (7, 3, 11)]
    rows = [(0, 4), (0, 9), (1, 2), (0, 1), (2, 6), (1, 5), (1, 3)]  # (prompt, completion length): groups interleaved
    batch = collate([prompts[p] for p, _ in rows], [torch.randint(5, 500, (c,)).tolist() for _, c in rows], 0)
    assert batch.num_prompts == 3 and batch.first_rows.tolist() == [0, 2, 4]
    weights = torch.randn(len(rows), batch.completion_mask.shape[1]) * batch.completion_mask
    results = []
    for share in (True, False):
        model.zero_grad(set_to_none=True)
        calls: list[tuple[int, int]] = []
        hook = model.get_decoder().register_forward_pre_hook(
            lambda _m, _a, kw, calls=calls: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)  # fmt: skip
        try:
            logprobs, entropy = completion_logprobs(model, batch, temperature=0.8, chunk_size=5, with_grad=True,
                                                    share_prompts=share)  # fmt: skip
        finally:
            hook.remove()
        (logprobs * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((logprobs.detach() * batch.completion_mask, entropy * batch.completion_mask, grads, calls))
    (shared_lp, shared_ent, shared_grads, shared_calls), (joint_lp, joint_ent, joint_grads, joint_calls) = results
    torch.testing.assert_close(shared_lp, joint_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared_ent, joint_ent, atol=1e-5, rtol=1e-5)
    model.zero_grad(set_to_none=True)
    accumulate_plain_gradients(model, batch, weights, temperature=0.8)
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in reference.items():
        torch.testing.assert_close(joint_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert joint_calls == [(7, batch.input_ids.shape[1])]
    assert shared_calls == [(3, 11), (7, batch.completion_mask.shape[1])]  # 3 prompts once, then the completions
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    layers = [m for m in model.modules() if hasattr(m, "_can_checkpoint_with_cache")]
    assert layers and all(m._can_checkpoint_with_cache is False for m in layers)  # the class's value again


@pytest.mark.parametrize("share", [True, False])
def test_weight_gradients_reach_grad_while_backward_runs(tmp_path: Path, share: bool) -> None:
    """A weight used twice in one graph (every weight in the shared-prompt forward, the tied embedding and head)
    must not have one use's gradient held by autograd until the other use's backward is done: that is a second copy
    of the gradients at the peak of backward. When backward reaches the completion tokens' embeddings (the end of
    the completions' forward, before the shared prompt's), every weight's `.grad` already holds that forward's
    share."""
    from thinktwice_pl.batching import collate
    from thinktwice_pl.builtin_models import build_tiny_model
    from thinktwice_pl.models import completion_logprobs, load_causal_lm

    model = load_causal_lm(str(build_tiny_model(tmp_path / "tied", tie_word_embeddings=True)))
    torch.manual_seed(0)
    batch = collate([[5, 6, 7, 8]] * 3, [torch.randint(5, 500, (c,)).tolist() for c in (4, 2, 3)], 0)
    outputs: list[torch.Tensor] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: outputs.append(out))
    try:
        logprobs, _ = completion_logprobs(model, batch, temperature=1.0, chunk_size=4, with_grad=True,
                                          share_prompts=share)  # fmt: skip
    finally:
        hook.remove()
    assert len(outputs) == (2 if share else 1)
    missing: list[list[str]] = []
    outputs[-1].register_hook(lambda _grad: missing.append(
        [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]))  # fmt: skip
    model.zero_grad(set_to_none=True)
    logprobs.sum().backward()
    assert missing == [[]]  # the embedding's own share comes next; the prompt's (shared) after it


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("share", [True, False])
def test_a_later_micro_batch_adds_head_and_embedding_gradients_to_grad_in_place(
    tmp_path: Path, tied: bool, share: bool
) -> None:
    """Once `.grad` exists, the ``[V, H]`` gradients of the LM head and the input embedding are added to it in place:
    autograd is handed only sparse tensors for them (no dense vocabulary-sized temporary per micro-batch), and the
    accumulated gradients still equal plain HF forwards', a padding row included (no gradient)."""
    from thinktwice_pl.batching import collate
    from thinktwice_pl.builtin_models import build_tiny_model
    from thinktwice_pl.models import completion_logprobs, load_causal_lm

    model = load_causal_lm(str(build_tiny_model(tmp_path / "m", tie_word_embeddings=tied)))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    embedding.padding_idx = 7  # a token the batches use: its row must get no gradient, as nn.Embedding's backward
    torch.manual_seed(0)
    batches = []
    for prompts, lengths in (([[5, 7, 8]] * 2 + [[9, 10]] * 2, (3, 2, 4, 1)), ([[7, 11, 12, 13]] * 3, (2, 5, 3))):
        completions = [[7, *torch.randint(5, 500, (c - 1,)).tolist()] for c in lengths]
        batch = collate(prompts, completions, 0)
        batches.append((batch, torch.randn(batch.completion_mask.shape) * batch.completion_mask))
    for batch, weights in batches:
        accumulate_plain_gradients(model, batch, weights, temperature=0.9)
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    padding_row = reference[next(n for n, p in model.named_parameters() if p is embedding.weight)][7]
    assert padding_row.any() == tied  # a tied weight's row 7 has the head's share alone

    model.zero_grad(set_to_none=True)
    layouts: list[list[torch.layout]] = []
    handles = [w.register_hook(lambda g: layouts[-1].append(g.layout)) for w in {head.weight, embedding.weight}]
    try:
        for batch, weights in batches:
            layouts.append([])
            logprobs, _ = completion_logprobs(model, batch, temperature=0.9, chunk_size=4, with_grad=True,
                                              share_prompts=share)  # fmt: skip
            (logprobs * weights).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], atol=1e-5, rtol=1e-4, msg=name)
    assert layouts[1] and set(layouts[1]) == {torch.sparse_coo}, layouts  # the second micro-batch: in place only
    assert "forward" not in vars(embedding)  # the lookup is the module's own again


def test_row_sparse_embedding_adds_the_dense_backwards_gradient_bit_for_bit() -> None:
    """Repeated ids, a padding id: `.grad` after the row-sparse add equals `.grad` after nn.Embedding's dense
    backward exactly (the rows are summed in the same order before the add)."""
    from thinktwice_pl.models import _embedding_gradient_in_place

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(40, 8, padding_idx=3)
    ids = torch.tensor([[5, 3, 5, 9, 5], [9, 1, 3, 5, 0]])
    upstream, start = torch.randn(2, 5, 8), torch.randn(40, 8)
    results = []
    for in_place in (False, True):
        embedding.weight.grad = start.clone()
        with _embedding_gradient_in_place(embedding) if in_place else contextlib.nullcontext():
            embedding(ids).backward(upstream)
        results.append(embedding.weight.grad)
    assert not torch.equal(results[0], start) and torch.equal(results[0][3], start[3])
    assert torch.equal(results[1], results[0])


def test_a_layer_that_drops_the_shared_prompt_cache_is_an_error_not_wrong_log_probs(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should checkpointed layers drop the cache anyway (another transformers, another wrapper), the completions would
    attend to themselves alone: the forward checks every layer read the prompt."""
    import contextlib

    import thinktwice_pl.models as models
    from thinktwice_pl.batching import collate

    monkeypatch.setattr(models, "_cache_kept_under_checkpointing", lambda _model: contextlib.nullcontext())
    model = models.load_causal_lm(str(tiny_model_dir), gradient_checkpointing=True)
    batch = collate([[5, 6, 7]] * 2, [[8, 9], [10]], 0)
    with pytest.raises(RuntimeError, match="did not read the shared prompt's KV cache"):
        models.completion_logprobs(model, batch, temperature=1.0, chunk_size=8, with_grad=True)


def test_prompt_sharing_is_off_for_sliding_window_attention(tiny_model_dir: Path) -> None:
    from thinktwice_pl.models import load_causal_lm, prompt_sharing_blocker

    model = load_causal_lm(str(tiny_model_dir))
    assert prompt_sharing_blocker(model) is None
    model.config.layer_types = ["sliding_attention", "full_attention"]
    assert prompt_sharing_blocker(model) == "attention layers ['full_attention', 'sliding_attention']"
    model.config.layer_types = ["full_attention", "full_attention"]
    model.config.use_sliding_window, model.config.sliding_window = True, 8
    assert prompt_sharing_blocker(model) == "sliding-window attention"


def test_refine_signals_by_hand() -> None:
    rollouts = [
        _rollout([1], [2], reward=1.0, base_correct=False),  # fixed
        _rollout([1], [2], reward=0.0, base_correct=False),  # still wrong
        _rollout([1], [2], reward=0.0, base_correct=False),
        _rollout([1], [2], reward=1.0, base_correct=True),  # kept
        _rollout([1], [2], reward=1.0, base_correct=True),
        _rollout([1], [2], reward=0.0, base_correct=True),  # damaged
    ]
    signals = refine_signals(rollouts)
    assert signals["base_correct_frac"] == pytest.approx(3 / 6)
    assert signals["fix_rate"] == pytest.approx(1 / 3)
    assert signals["keep_rate"] == pytest.approx(2 / 3)
    assert signals["reward_share_from_wrong"] == pytest.approx(1 / 3)  # 1 of the 3 reward points
    only_right = refine_signals(rollouts[3:])
    assert math.isnan(only_right["fix_rate"])  # undefined without wrong bases, and then not logged


def test_fp16_amp_is_refused_other_precisions_pass() -> None:
    # (Lightning turns 16-mixed into bf16-mixed on CPU, so the check is called directly.)
    with pytest.raises(ValueError, match=r"trainer\.precision=16-mixed"):
        check_precision("16-mixed")
    for ok in ("32-true", "bf16-mixed", "bf16-true"):
        check_precision(ok)


def test_dropout_is_disabled_by_default(tmp_path: Path) -> None:
    from thinktwice_pl.builtin_models import build_tiny_model
    from thinktwice_pl.models import load_causal_lm

    path = build_tiny_model(tmp_path / "tiny")
    config = json.loads((path / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (path / "config.json").write_text(json.dumps(config))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    noisy = load_causal_lm(str(path), disable_dropout=False)
    attn = [m for m in noisy.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    assert attn and all(m.attention_dropout == 0.5 for m in attn)
    assert not torch.equal(noisy(ids).logits, noisy(ids).logits)  # train mode + dropout: two passes differ
    clean = load_causal_lm(str(path))
    assert clean.training
    assert all(m.attention_dropout == 0.0 for m in clean.modules() if hasattr(m, "attention_dropout"))
    assert torch.equal(clean(ids).logits, clean(ids).logits)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_token_budget_micro_batches_give_the_gradient_of_one_big_batch(tiny_model_dir: Path, loss_type: str) -> None:
    from types import SimpleNamespace

    torch.manual_seed(0)
    lengths = [(7, 5), (3, 9), (11, 2), (4, 4), (6, 8), (2, 3)]  # (prompt, completion) tokens
    rollouts = [_rollout(torch.randint(5, 500, (p,)).tolist(), torch.randint(5, 500, (c,)).tolist())
                for p, c in lengths]  # fmt: skip
    advantages = torch.tensor([0.5, -0.5, 0.25, -0.25, 0.75, -0.75])

    def gradients(budget: int | None) -> tuple[dict[str, torch.Tensor], int]:
        module = ThinkTwiceModule(model_name_or_path=str(tiny_model_dir), problems_per_batch=1, num_generations=6,
                                  mini_batch_problems=1, max_grad_norm=None, loss_type=loss_type,
                                  max_tokens_per_microbatch=budget)  # fmt: skip
        module.configure_model()
        module._trainer = SimpleNamespace(world_size=1, global_rank=0, strategy=None)  # what _optimizer_step reads
        module.manual_backward = lambda loss: loss.backward()
        opt = torch.optim.SGD(module.policy.parameters(), lr=0.0)  # lr 0: the gradients stay to be compared
        module.optimizers = lambda: opt
        plan = plan_phase(lengths, 6, [True] * 6, [True] * 6, mini_batch_groups=1, micro_batch_size=None,
                          max_tokens=budget)  # fmt: skip
        [step] = plan.steps
        for work in step.passes:  # the budget holds: rows x (longest prompt + longest completion)
            width = max(lengths[i][0] for i in work.rows) + max(lengths[i][1] for i in work.rows)
            assert budget is None or len(work.rows) == 1 or len(work.rows) * width <= budget
        module._optimizer_step(rollouts, step, advantages, {})
        return {n: p.grad.clone() for n, p in module.policy.named_parameters()}, len(step.passes)

    whole, one = gradients(None)
    split, many = gradients(30)
    assert one == 1 and many >= 3
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-5, atol=1e-7, msg=name)


FRAGMENTED_HEAP = """
import torch
from thinktwice_pl.models import trim_host_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
torch.empty(8 << 20, dtype=torch.uint8).fill_(1)  # freed at once: glibc now serves blocks up to 8 MiB from its heap
base = rss()
blocks = [torch.empty(4 << 20, dtype=torch.uint8).fill_(1) for _ in range(64)]  # 256 MiB on the heap
del blocks[:-1:2]  # 32 freed 4 MiB holes below live blocks: the heap cannot shrink from its top
held = rss() - base
trim_host_memory()
print(held, rss() - base)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc")
def test_trim_host_memory_returns_freed_heap_pages() -> None:
    """Between phases the freed tensors of a few MiB (activations, KV caches) stay resident in glibc's heap until
    trimmed: 128 MiB of holes among 128 MiB of live blocks go back to the system."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    held, trimmed = map(float, out.stdout.split())
    assert held == pytest.approx(256, abs=24)  # the holes are still resident
    assert trimmed == pytest.approx(128, abs=24)


_ALLOCATOR_CHECK = """
import ctypes, sys, torch
from thinktwice_pl.models import configure_host_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                              "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
large = torch.empty(20 << 20, dtype=torch.uint8)
del large  # glibc raises its dynamic threshold to 20 MiB here
if sys.argv[1] == "configure":
    configure_host_allocator()
before = libc.mallinfo2().hblkhd
tensor = torch.empty(5 << 20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd - before
del tensor
print(mapped, libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_host_allocator_returns_freed_tensors_of_4_mib_and_more_to_the_system() -> None:
    """glibc raises its mmap threshold to the size of each mapped block that is freed: after a 20 MiB tensor is
    freed, a 5 MiB one comes from the heap and stays resident once freed. `configure_host_allocator` fixes the
    threshold at 4 MiB, so the 5 MiB tensor is a mapping of its own (mallinfo2's hblkhd), unmapped when freed.
    A fresh process each: a heap that already holds a free block of that size serves it whatever the threshold."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    results = {}
    for mode in ("configure", "default"):
        done = subprocess.run([sys.executable, "-c", _ALLOCATOR_CHECK, mode], env=env, capture_output=True,
                              text=True, timeout=120, check=True)  # fmt: skip
        results[mode] = [int(x) for x in done.stdout.split()]
    assert results["configure"][0] >= 5 << 20 and results["configure"][1] == 0  # mapped, then unmapped
    assert results["default"][0] == 0  # glibc's own behaviour, which the call changes
