"""The log-prob forward over completions (`thinktwice_pl.logprobs`): padding, the shared prompt, gradients."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
import torch
from grad_helpers import accumulate_plain_gradients
from rollout_helpers import make_rollout

from thinktwice_pl.module import ThinkTwiceModule


def test_padded_micro_batch_logprobs_equal_unpadded_forward(tiny_model_dir: Path) -> None:
    module = ThinkTwiceModule(
        model_name_or_path=str(tiny_model_dir), problems_per_batch=1, mini_batch_problems=1, num_generations=2
    )
    module.configure_model()
    torch.manual_seed(0)
    rollouts = [  # different prompt and completion lengths: left and right padding both in play
        make_rollout(torch.randint(5, 500, (7,)).tolist(), torch.randint(5, 500, (5,)).tolist()),
        make_rollout(torch.randint(5, 500, (3,)).tolist(), torch.randint(5, 500, (9,)).tolist()),
        make_rollout(torch.randint(5, 500, (11,)).tolist(), torch.randint(5, 500, (1,)).tolist()),
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
    from thinktwice_pl.logprobs import completion_logprobs
    from thinktwice_pl.models import load_causal_lm

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
            lambda _m, _a, kw, calls=calls: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True
        )
        try:
            logprobs, entropy = completion_logprobs(
                model, batch, temperature=0.8, chunk_size=5, with_grad=True, share_prompts=share
            )
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
    from thinktwice_pl.logprobs import completion_logprobs
    from thinktwice_pl.models import load_causal_lm

    model = load_causal_lm(str(build_tiny_model(tmp_path / "tied", tie_word_embeddings=True)))
    torch.manual_seed(0)
    batch = collate([[5, 6, 7, 8]] * 3, [torch.randint(5, 500, (c,)).tolist() for c in (4, 2, 3)], 0)
    outputs: list[torch.Tensor] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: outputs.append(out))
    try:
        logprobs, _ = completion_logprobs(
            model, batch, temperature=1.0, chunk_size=4, with_grad=True, share_prompts=share
        )
    finally:
        hook.remove()
    assert len(outputs) == (2 if share else 1)
    missing: list[list[str]] = []
    outputs[-1].register_hook(
        lambda _grad: missing.append([n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()])
    )
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
    from thinktwice_pl.logprobs import completion_logprobs
    from thinktwice_pl.models import load_causal_lm

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
            logprobs, _ = completion_logprobs(
                model, batch, temperature=0.9, chunk_size=4, with_grad=True, share_prompts=share
            )
            (logprobs * weights).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], atol=1e-5, rtol=1e-4, msg=name)
    assert layouts[1] and set(layouts[1]) == {torch.sparse_coo}, layouts  # the second micro-batch: in place only
    assert "forward" not in vars(embedding)  # the lookup is the module's own again


def test_a_layer_that_drops_the_shared_prompt_cache_is_an_error_not_wrong_log_probs(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should checkpointed layers drop the cache anyway (another transformers, another wrapper), the completions would
    attend to themselves alone: the forward checks every layer read the prompt."""

    import thinktwice_pl.logprobs as logprobs
    from thinktwice_pl.batching import collate
    from thinktwice_pl.models import load_causal_lm

    monkeypatch.setattr(logprobs, "_cache_kept_under_checkpointing", lambda _model: contextlib.nullcontext())
    model = load_causal_lm(str(tiny_model_dir), gradient_checkpointing=True)
    batch = collate([[5, 6, 7]] * 2, [[8, 9], [10]], 0)
    with pytest.raises(RuntimeError, match="did not read the shared prompt's KV cache"):
        logprobs.completion_logprobs(model, batch, temperature=1.0, chunk_size=8, with_grad=True)


def test_prompt_sharing_is_off_for_sliding_window_attention(tiny_model_dir: Path) -> None:
    from thinktwice_pl.logprobs import prompt_sharing_blocker
    from thinktwice_pl.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    assert prompt_sharing_blocker(model) is None
    model.config.layer_types = ["sliding_attention", "full_attention"]
    assert prompt_sharing_blocker(model) == "attention layers ['full_attention', 'sliding_attention']"
    model.config.layer_types = ["full_attention", "full_attention"]
    model.config.use_sliding_window, model.config.sliding_window = True, 8
    assert prompt_sharing_blocker(model) == "sliding-window attention"
