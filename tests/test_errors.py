"""How failures reach the user: one line for their mistakes, a traceback for bugs, the notes (resume command) last."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from thinktwice_pl.builtin_models import check_model_name_or_path
from thinktwice_pl.errors import MissingExtraError, UserError, add_note, is_out_of_memory, report
from thinktwice_pl.optional import require


def _raise(error: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        raise error from cause
    except BaseException as caught:
        return caught


def test_a_user_error_is_one_line_even_when_wrapped_and_its_notes_come_last() -> None:
    inner = _raise(UserError("data.problems_per_batch=5 is not divisible by model.mini_batch_problems=2"))
    wrapped = _raise(ValueError("Does not validate against any of the Union subtypes\nSubtypes: ..."), inner)
    add_note(wrapped, "Saved the run to x.ckpt. Resume with:\n  thinktwice fit --ckpt_path x.ckpt")
    out = io.StringIO()
    assert report(wrapped, debug=False, stream=out) == 2
    assert out.getvalue().splitlines() == [
        "error: data.problems_per_batch=5 is not divisible by model.mini_batch_problems=2",
        "Saved the run to x.ckpt. Resume with:",
        "  thinktwice fit --ckpt_path x.ckpt",
    ]


def test_a_bug_keeps_its_traceback_and_debug_shows_one_for_user_errors_too() -> None:
    bug = _raise(KeyError("policy.lm_head.weight"))
    add_note(bug, "Resume with:\n  thinktwice fit --ckpt_path x.ckpt")
    out = io.StringIO()
    assert report(bug, debug=False, stream=out) == 1
    text = out.getvalue()
    assert text.startswith("Traceback (most recent call last)") and "KeyError: 'policy.lm_head.weight'" in text
    assert text.rstrip().endswith("  thinktwice fit --ckpt_path x.ckpt") and text.count("Resume with") == 1
    out = io.StringIO()
    assert report(_raise(UserError("bad row")), debug=True, stream=out) == 2
    assert "Traceback" in out.getvalue() and out.getvalue().rstrip().endswith("UserError: bad row")


def test_a_missing_extra_is_a_user_error(monkeypatch) -> None:
    missing = type("Missing", (), {"__bool__": lambda self: False})()
    with pytest.raises(MissingExtraError) as info:
        require(missing, "model.quantization (QLoRA)", "pip install 'thinktwice_pl[quant]'")
    assert isinstance(info.value, ModuleNotFoundError)
    out = io.StringIO()
    assert report(info.value, debug=False, stream=out) == 2
    assert out.getvalue() == (
        "error: model.quantization (QLoRA) needs a package that is not installed: pip install 'thinktwice_pl[quant]'\n"
    )


def test_out_of_memory_is_recognised_on_gpu_and_cpu() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 8589934592 bytes"
        )
    )
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_model_names_are_checked_before_transformers_sees_them(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    check_model_name_or_path(str(tiny_model_dir))
    check_model_name_or_path("thinktwice:tiny")
    with pytest.raises(
        UserError,
        match=r"model.model_name_or_path=/no/such/model is neither a local directory nor a "
        "hub name",
    ):
        check_model_name_or_path("/no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"is a directory without a config\.json"):
        check_model_name_or_path("empty")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="is a file; give the model directory"):
        check_model_name_or_path("model.safetensors")
    with pytest.raises(UserError, match=r"unknown built-in model 'thinktwice:huge'"):
        check_model_name_or_path("thinktwice:huge")
    # offline (the suite sets HF_HUB_OFFLINE=1): a hub name must be in the local cache
    with pytest.raises(UserError, match="my-org/my-model is not a local directory, and it is not in the hub cache"):
        check_model_name_or_path("my-org/my-model")
