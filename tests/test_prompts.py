"""prompts.py through real chat templates (the tiny model's ChatML, a Qwen3-style one, SmolLM2's when present)."""

from __future__ import annotations

from pathlib import Path

import pytest

from thinktwice_pl.models import load_tokenizer
from thinktwice_pl.prompts import (
    DEFAULT_REFINE_INSTRUCTION,
    DEFAULT_SOLVE_SUFFIX,
    encode_chat,
    refine_messages,
    render_chat,
    solve_messages,
)

SOLVE_SUFFIX = (  # METHOD.md section 2, verbatim
    r"Solve the following math problem step by step. Put your final answer inside \boxed{}, like \boxed{42} "
    r"or \boxed{\frac{1}{2}}."
)


def test_default_texts_are_the_papers() -> None:
    assert DEFAULT_SOLVE_SUFFIX == SOLVE_SUFFIX
    lines = DEFAULT_REFINE_INSTRUCTION.split("\n")
    assert lines[0] == "Follow this instruction, carefully review your previous solution:"
    assert lines[1].startswith("1. Go through each calculation step-by-step.")
    assert lines[4] == "4. Finally, after finishing the review, provide your refined solution and answer."
    assert DEFAULT_REFINE_INSTRUCTION.endswith("answer.\n") and len(lines) == 6  # each line ends in a newline


def test_solve_prompt_renders_one_user_turn_with_generation_prompt(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    text = render_chat(solve_messages("What is 2 + 3?"), tok)
    assert text == f"<|im_start|>user\nWhat is 2 + 3? {SOLVE_SUFFIX}<|im_end|>\n<|im_start|>assistant\n"
    ids = encode_chat(solve_messages("What is 2 + 3?"), tok)
    assert tok.decode(ids) == text  # no extra special tokens around the template


def test_refine_prompt_holds_the_earlier_answer_without_its_end_of_turn(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    messages = refine_messages("What is 2 + 3?", "2 + 3 = 5, so \\boxed{5}.<|im_end|>\n", tok)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == "2 + 3 = 5, so \\boxed{5}."
    text = render_chat(messages, tok)
    assert text.count("<|im_end|>") == 3  # one per turn: the answer's own marker was removed
    assert text.endswith(f"<|im_start|>user\n{DEFAULT_REFINE_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    custom = refine_messages("Q?", "A", tok, solve_suffix="Think.", refine_instruction="Check it.")
    assert custom[0]["content"] == "Q? Think." and custom[2]["content"] == "Check it."


def test_enable_thinking_false_reaches_templates_that_read_it(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    tok.chat_template = (  # the switch of Qwen3's template, reduced to what matters here
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
    )
    assert render_chat(solve_messages("Q"), tok).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_a_tokenizer_without_chat_template_is_refused(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        render_chat(solve_messages("Q"), tok)
