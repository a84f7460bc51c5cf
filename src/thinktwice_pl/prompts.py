"""Solve and refine chats (METHOD.md section 2), rendered through the model's chat template.

The solve chat is one user turn: the problem, a space, then the solve instruction. The refine chat
adds the model's own earlier answer as an assistant turn (plain text, its end-of-turn marker
removed) and the review instruction as a third user turn. Both texts are configurable; the defaults
are the exact strings of the ThinkTwice reference code.
"""

from __future__ import annotations

from typing import Any

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


def render_chat(messages: list[Message], tokenizer: Any) -> str:
    """Apply the chat template with the generation prompt; ``enable_thinking=False`` where the template reads it."""
    template = tokenizer.chat_template
    if not template:
        raise ValueError(
            f"tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat_template; ThinkTwice needs an "
            "instruct/chat model (or set tokenizer.chat_template before training)"
        )
    kwargs: dict[str, Any] = {}
    if isinstance(template, str) and "enable_thinking" in template:
        kwargs["enable_thinking"] = False
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs))


def tokenize_rendered(text: str, tokenizer: Any) -> list[int]:
    """Token ids of a rendered chat; the template already holds any BOS, so no special tokens are added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_chat(messages: list[Message], tokenizer: Any) -> list[int]:
    """Render and tokenize a chat."""
    return tokenize_rendered(render_chat(messages, tokenizer), tokenizer)
