"""prompts.py through real chat templates (the tiny model's ChatML, Qwen3-, Olmo-3-, Qwen2.5- and Gemma-style ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from thinktwice_pl.builtin_models import CHATML_TEMPLATE
from thinktwice_pl.models import load_tokenizer
from thinktwice_pl.prompts import (
    DEFAULT_REFINE_INSTRUCTION,
    DEFAULT_SOLVE_SUFFIX,
    default_system_turn,
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


# ChatML templates that insert a default system turn into a chat without one, as Olmo-3's and Qwen2.5's do
OLMO3_LIKE = (
    "{%- if messages|selectattr('role', 'equalto', 'system')|list|length == 0 -%}"
    "{{- '<|im_start|>system\\nYou are a helpful function-calling AI assistant. You do not currently have access to "
    "any functions. <functions></functions><|im_end|>\\n' -}}{%- endif -%}"
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
QWEN25_LIKE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You "
    "are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("template", [OLMO3_LIKE, QWEN25_LIKE], ids=["olmo3", "qwen2.5"])
def test_remove_system_prompt_renders_the_chat_without_the_templates_default_system_turn(
    tiny_model_dir: Path, template: str
) -> None:
    plain = load_tokenizer(str(tiny_model_dir))  # ChatML without a default system prompt
    tok = load_tokenizer(str(tiny_model_dir))
    tok.chat_template = template
    solve = solve_messages("What is 2 + 3?")
    refine = refine_messages("What is 2 + 3?", "2 + 3 = 5, so \\boxed{5}.", tok)
    assert render_chat(solve, tok).startswith("<|im_start|>system\nYou are")  # the default is there without the flag
    for chat in (solve, refine):
        text = render_chat(chat, tok, remove_system_prompt=True)
        assert text == render_chat(chat, plain)  # exactly the chat without a system turn
        assert text.startswith("<|im_start|>user\nWhat is 2 + 3?") and "system" not in text
        assert encode_chat(chat, tok, remove_system_prompt=True) == encode_chat(chat, plain)
    lead, system_turn, user_header = default_system_turn(tok)
    assert lead == "" and system_turn.startswith("<|im_start|>system\n") and system_turn.endswith("<|im_end|>\n")
    assert user_header == "<|im_start|>user\n"


# SmolLM2-135M-Instruct's template, whose BOS token is <|im_start|>, the turn marker itself
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Llama-3.1's template, reduced: the system turn is always written, with a date header
LLAMA31_LIKE = (
    "{{- bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{%- set messages = messages[1:] %}{% endif %}<|eot_id|>"
    "{%- for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{%- endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_remove_system_prompt_keeps_what_the_template_writes_before_the_system_turn(tiny_model_dir: Path) -> None:
    plain = load_tokenizer(str(tiny_model_dir))
    tok = load_tokenizer(str(tiny_model_dir))
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = "{{- bos_token }}" + QWEN25_LIKE
    text = render_chat(solve_messages("Q"), tok, remove_system_prompt=True)
    assert text == f"<|endoftext|><|im_start|>user\nQ {SOLVE_SUFFIX}<|im_end|>\n<|im_start|>assistant\n"
    tok.chat_template = LLAMA31_LIKE  # a system turn that always holds a date header, empty content by default
    text = render_chat(solve_messages("Q"), tok, remove_system_prompt=True)
    assert text == f"<|endoftext|><|start_header_id|>user<|end_header_id|>\n\nQ {SOLVE_SUFFIX}<|eot_id|>" + (
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    tok.bos_token = "<|im_start|>"  # SmolLM2: the BOS is the turn marker, nothing comes before the system turn
    tok.chat_template = SMOLLM2
    assert default_system_turn(tok)[0] == ""
    for chat in (solve_messages("Q"), refine_messages("Q", "A", tok)):
        assert render_chat(chat, tok, remove_system_prompt=True) == render_chat(chat, plain)


def test_remove_system_prompt_is_a_no_op_for_templates_without_a_default_system_prompt(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    merging = (  # Gemma-style: a system message is merged into the first user turn; none is inserted
        "{%- if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n\\n' %}"
        "{% set messages = messages[1:] %}{% else %}{% set first = '' %}{% endif %}"
        "{%- for m in messages %}<start_of_turn>{{ m['role'] }}\n{% if loop.first %}{{ first }}{% endif %}"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    refusing = (
        "{%- for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    for template in (tok.chat_template, merging, refusing):
        tok.chat_template = template
        assert default_system_turn(tok) is None
        for chat in (solve_messages("Q"), refine_messages("Q", "A", tok)):
            assert render_chat(chat, tok, remove_system_prompt=True) == render_chat(chat, tok)


def test_remove_system_prompt_refuses_a_system_turn_it_cannot_cut_out(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    # a fixed system turn that an explicit system message does not replace
    tok.chat_template = "<|im_start|>system\nAlways here.<|im_end|>\n" + CHATML_TEMPLATE
    with pytest.raises(ValueError, match=r"rollout.remove_system_prompt is set but the chat template writes"):
        render_chat(solve_messages("Q"), tok, remove_system_prompt=True)
    assert render_chat(solve_messages("Q"), tok).startswith("<|im_start|>system\nAlways here.")  # flag off: as is
    # a default system prompt that changes with the chat: the probe's does not match the refine chat's
    tok.chat_template = QWEN25_LIKE.replace("You are", "You see ' + (messages|length|string) + ' turns. You are", 1)
    assert render_chat(solve_messages("Q"), tok).startswith("<|im_start|>system\nYou see 1 turns. You are Qwen")
    assert render_chat(solve_messages("Q"), tok, remove_system_prompt=True).startswith("<|im_start|>user\n")
    with pytest.raises(ValueError, match=r"rollout.remove_system_prompt is set but this prompt does not start with"):
        render_chat(refine_messages("Q", "A", tok), tok, remove_system_prompt=True)


def test_build_prompts_truncates_refine_prompts_on_the_left_and_refuses_long_solve_prompts(tiny_model_dir) -> None:
    from thinktwice_pl.models import load_tokenizer
    from thinktwice_pl.prompts import PromptSettings, build_prompts, encode_chat, refine_messages
    from thinktwice_pl.types import Problem

    tokenizer = load_tokenizer(str(tiny_model_dir))
    problems = [Problem("short", "What is 1 + 1?", "2"), Problem("long", "What is 1 + 1? " * 30, "2")]
    solve = build_prompts(problems, tokenizer, PromptSettings())
    short, long = (len(ids) for ids in solve.ids)
    assert short < long and solve.truncated == []
    settings = PromptSettings(max_prompt_length=long - 1)
    with pytest.raises(
        ValueError,
        match=rf"solve prompt of problem 'long' has {long} tokens > "
        rf"rollout.max_prompt_length={long - 1}",
    ):
        build_prompts(problems, tokenizer, settings)
    reviewed = ["The answer is \\boxed{2}.", "It is 2."]
    full = [encode_chat(refine_messages(p.prompt_text, r, tokenizer), tokenizer) for p, r in zip(problems, reviewed)]
    limit = len(full[0]) + 1  # the short problem's refine prompt fits, the long one's does not
    refine = build_prompts(problems, tokenizer, PromptSettings(max_prompt_length=limit), reviewed)
    assert refine.truncated == [1]
    assert refine.ids == [full[0], full[1][-limit:]]  # the last tokens: the answer under review and the instruction
    assert refine.texts[1] == tokenizer.decode(full[1][-limit:], skip_special_tokens=False)  # what the grader sees
