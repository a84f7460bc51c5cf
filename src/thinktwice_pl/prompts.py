"""Solve and refine chats (METHOD.md section 2), rendered through the model's chat template.

The solve chat is one user turn: the problem, a space, then the solve instruction. The refine chat
adds the model's own earlier answer as an assistant turn (plain text, its end-of-turn marker
removed) and the review instruction as a third user turn. Both texts are configurable; the defaults
are the exact strings of the ThinkTwice reference code. `build_prompts` makes the token ids of either
kind for training and evaluation alike, with the prompt limit applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from thinktwice_pl.errors import UserError
from thinktwice_pl.types import Phase, Problem

DEFAULT_SOLVE_SUFFIX = (
    "Solve the following math problem step by step. Put your final answer inside \\boxed{}, "
    "like \\boxed{42} or \\boxed{\\frac{1}{2}}."
)

DEFAULT_REFINE_INSTRUCTION = (
    "Follow this instruction, carefully review your previous solution:\n"
    "1. Go through each calculation step-by-step. Check if there are any errors in calculations, logic, "
    "or problem understanding.\n"
    "2. If you find any mistakes, explicitly point out what was wrong and explain the correct approach.\n"
    "3. If the solution is already correct, verify each step and explain it more clearly.\n"
    "4. Finally, after finishing the review, provide your refined solution and answer.\n"
)

Message = dict[str, str]


def solve_messages(problem_text: str, solve_suffix: str = DEFAULT_SOLVE_SUFFIX) -> list[Message]:
    """The solve chat: a single user message, ``problem + " " + suffix`` (no system prompt)."""
    return [{"role": "user", "content": f"{problem_text} {solve_suffix}" if solve_suffix else problem_text}]


def strip_end_of_turn(text: str, tokenizer: Any) -> str:
    """Remove trailing end-of-turn / EOS markers so the earlier answer goes into the chat as text only."""
    markers = {m for m in (getattr(tokenizer, "eos_token", None), "<|im_end|>", "<|eot_id|>", "<|endoftext|>") if m}
    stripped = text.rstrip()
    changed = True
    while changed:
        changed = False
        for marker in markers:
            if stripped.endswith(marker):
                stripped = stripped[: -len(marker)].rstrip()
                changed = True
    return stripped


def refine_messages(
    problem_text: str,
    base_answer: str,
    tokenizer: Any,
    solve_suffix: str = DEFAULT_SOLVE_SUFFIX,
    refine_instruction: str = DEFAULT_REFINE_INSTRUCTION,
) -> list[Message]:
    """The refine chat: user = solve prompt, assistant = the earlier answer, user = review instruction."""
    return [
        *solve_messages(problem_text, solve_suffix),
        {"role": "assistant", "content": strip_end_of_turn(base_answer, tokenizer)},
        {"role": "user", "content": refine_instruction},
    ]


def render_chat(messages: list[Message], tokenizer: Any, remove_system_prompt: bool = False) -> str:
    """Apply the chat template with the generation prompt; ``enable_thinking=False`` where the template reads it.

    With `remove_system_prompt` the system turn that the template inserts into a chat without one (Olmo-3,
    Qwen2.5, SmolLM2 do) is left out, as the reference code's ``remove_system_prompt`` does for Olmo-3; a no-op for
    templates that insert none. See `default_system_turn`.
    """
    text = _apply_template(messages, tokenizer, add_generation_prompt=True)
    if not remove_system_prompt:
        return text
    found = default_system_turn(tokenizer)
    if found is None:
        return text
    lead, system_turn, user_header = found
    rest = text[len(lead) :]
    if not (text.startswith(lead) and rest.startswith(system_turn + user_header)):
        raise UserError(
            f"rollout.remove_system_prompt is set but this prompt does not start with the chat template's default "
            f"system turn {system_turn!r} followed by a user turn (it starts {text[:200]!r}); the template varies its "
            "default system prompt, so it cannot be cut out: unset rollout.remove_system_prompt or give the tokenizer "
            "a template without a default system prompt"
        )
    return lead + rest[len(system_turn) :]


_PROBE_SYSTEM = "ThinkTwiceProbeSystemText"
_PROBE_USER = "ThinkTwiceProbeUserText"


def default_system_turn(tokenizer: Any) -> tuple[str, str, str] | None:
    """The system turn a chat template inserts when a chat has no system message, found from probe chats.

    A lone user turn renders as ``lead + system turn + user header + text ...``; an explicit system message shows
    where a system turn's text sits (``opener + text + end of turn + user header``), and a lone user turn without
    generation prompt shows the end-of-turn marker. `lead` is what the template writes before any turn (a BOS
    text, kept), found as the part of the opener before the user header with its role renamed to system. The
    reference code instead drops every token before ``<|im_start|>user`` (ChatML templates only, BOS included).

    Returns:
        ``(lead, system turn, user header)``, or None when the template inserts no system turn.

    Raises:
        ValueError: the template writes something before the user turn that names a system role but does not have
            the shape of a removable system turn.
    """
    from jinja2 import TemplateError

    user = [{"role": "user", "content": _PROBE_USER}]
    plain = _apply_template(user, tokenizer, add_generation_prompt=True)
    head = plain[: plain.index(_PROBE_USER)]  # lead + [system turn] + user header
    try:
        with_system = _apply_template(
            [{"role": "system", "content": _PROBE_SYSTEM}, *user], tokenizer, add_generation_prompt=True
        )
    except TemplateError:  # e.g. "System role not supported"
        with_system = ""
    if _PROBE_SYSTEM in with_system and _PROBE_USER in with_system:
        at = with_system.index(_PROBE_SYSTEM)
        opener = with_system[:at]  # lead + system header
        between = with_system[at + len(_PROBE_SYSTEM) : with_system.index(_PROBE_USER)]  # end of turn + user header
        closed = _apply_template(user, tokenizer, add_generation_prompt=False)
        end_of_turn = closed[closed.index(_PROBE_USER) + len(_PROBE_USER) :]
        if (
            head.startswith(opener)
            and head.endswith(between)
            and len(head) >= len(opener) + len(between)
            and between.startswith(end_of_turn)
        ):
            user_header = between[len(end_of_turn) :]
            # what the template writes before the system turn (a BOS): the opener up to the user header with its
            # role renamed; when there is no such header, everything before the user turn goes, as in the reference
            lead = opener[: max(0, opener.find(user_header.replace("user", "system", 1)))]
            return lead, head[len(lead) : len(head) - len(user_header)], user_header
    if "system" in head.lower():
        raise UserError(
            f"rollout.remove_system_prompt is set but the chat template writes {head!r} before the user's text, "
            "which names a system role yet is not a system turn that can be cut out (an explicit system message "
            "does not take its place); unset rollout.remove_system_prompt or edit tokenizer.chat_template"
        )
    return None


def _apply_template(messages: list[Message], tokenizer: Any, *, add_generation_prompt: bool) -> str:
    template = tokenizer.chat_template
    if not template:
        raise UserError(
            f"tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat_template; ThinkTwice needs an "
            "instruct/chat model (or set tokenizer.chat_template before training)"
        )
    kwargs: dict[str, Any] = {}
    if isinstance(template, str) and "enable_thinking" in template:
        kwargs["enable_thinking"] = False
    return str(
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    )


def tokenize_rendered(text: str, tokenizer: Any) -> list[int]:
    """Token ids of a rendered chat; the template already holds any BOS, so no special tokens are added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat(messages: list[Message], tokenizer: Any, remove_system_prompt: bool = False) -> list[int]:
    """Render and tokenize a chat."""
    return tokenize_rendered(render_chat(messages, tokenizer, remove_system_prompt), tokenizer)


@dataclass(frozen=True)
class PromptSettings:
    """How prompts are written (the rollout callback's settings, shared by training and evaluation)."""

    solve_suffix: str = DEFAULT_SOLVE_SUFFIX
    refine_instruction: str = DEFAULT_REFINE_INSTRUCTION
    remove_system_prompt: bool = False
    max_prompt_length: int | None = None


@dataclass
class Prompts:
    """Rendered prompts: the texts the grader sees, the token ids the policy sees, and which were truncated."""

    texts: list[str]
    ids: list[list[int]]
    truncated: list[int]  # indices of refine prompts that kept only their last max_prompt_length tokens


def build_prompts(
    problems: list[Problem], tokenizer: Any, settings: PromptSettings, reviewed: list[str] | None = None
) -> Prompts:
    """Solve prompts of `problems`, or with `reviewed` (the earlier answer under review for each problem) refine
    prompts, rendered and tokenized.

    A refine prompt longer than ``max_prompt_length`` keeps its last tokens (left truncation: the start of the
    problem goes first, the answer under review and the instruction stay), as in the reference code; its text is
    then the decoded kept tokens. A longer solve prompt is an error naming the problem: it would lose its start.
    """
    phase: Phase = "solve" if reviewed is None else "refine"
    if reviewed is None:
        chats = [solve_messages(p.prompt_text, settings.solve_suffix) for p in problems]
    else:
        chats = [
            refine_messages(p.prompt_text, answer, tokenizer, settings.solve_suffix, settings.refine_instruction)
            for p, answer in zip(problems, reviewed, strict=True)
        ]
    texts = [render_chat(chat, tokenizer, settings.remove_system_prompt) for chat in chats]
    ids = [tokenize_rendered(text, tokenizer) for text in texts]
    limit = settings.max_prompt_length
    too_long = [i for i, row in enumerate(ids) if limit is not None and len(row) > limit]
    if too_long and phase == "solve":
        i = too_long[0]
        raise UserError(
            f"the solve prompt of problem {problems[i].id!r} has {len(ids[i])} tokens > "
            f"rollout.max_prompt_length={limit} ({len(too_long)} of {len(ids)} prompts of this batch): "
            "raise rollout.max_prompt_length or leave such problems out of the data (solve prompts are never "
            "truncated; refine prompts, which hold an earlier answer, keep their last tokens)"
        )
    for i in too_long:
        ids[i] = ids[i][-limit:]  # type: ignore[index]
        texts[i] = tokenizer.decode(ids[i], skip_special_tokens=False)  # the grader sees what the policy saw
    return Prompts(texts, ids, too_long)
