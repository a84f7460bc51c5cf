"""The models of ``thinktwice-cross-refine --model NAME=PATH``: loaded one at a time, with the sampler that serves
them, and freed before the next one.

PATH is an HF model directory, a built-in ``thinktwice:`` name, or a ``.ckpt`` written by ``thinktwice fit``: its
model is rebuilt from the checkpoint's ``model_name_or_path`` (and LoRA settings) with the project's loader, then the
checkpoint's weights are loaded into it (LoRA adapters are merged into the base, so any engine serves it).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from thinktwice_pl.builtin_models import check_model_name_or_path, resolve_model_path
from thinktwice_pl.errors import UserError
from thinktwice_pl.models import LoraSettings, load_causal_lm, load_tokenizer
from thinktwice_pl.rollout import HFRolloutEngine, RolloutEngine

log = logging.getLogger("thinktwice_pl.cross_refine")
EngineFactory = Callable[[str, dict[str, Any]], RolloutEngine]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device {device}: use auto, cpu or cuda (cuda:N)")
    return device


def make_engine(kind: str, engine_args: dict[str, Any]) -> RolloutEngine:
    if kind == "vllm":
        from thinktwice_pl.rollout.vllm import VLLMRolloutEngine

        cls: Any = VLLMRolloutEngine
    else:
        cls = HFRolloutEngine
    try:
        return cls(**engine_args)  # type: ignore[no-any-return]
    except TypeError as error:
        raise UserError(f"--engine-args {engine_args}: {error}; see the arguments of {cls.__name__}") from None


@contextmanager
def loaded(
    name: str, path: str, dtype: str, device: str, engine: tuple[EngineFactory, str, dict[str, Any]]
) -> Iterator[tuple[Any, RolloutEngine]]:
    """The model of ``--model name=path`` with its tokenizer and a set-up sampler; all freed afterwards. `engine`:
    (factory, kind, arguments) of the sampler."""
    start = time.perf_counter()
    model, tokenizer = load_policy(name, path, dtype)
    model = model.to(device).eval().requires_grad_(False)
    factory, kind, engine_args = engine
    sampler = factory(kind, dict(engine_args))
    sampler.setup(model, tokenizer)
    log.info("model %s loaded from %s in %.1f s", name, path, time.perf_counter() - start)
    try:
        yield tokenizer, sampler
    finally:
        sampler.close()
        del model, sampler
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_policy(name: str, path: str, dtype: str) -> tuple[Any, Any]:
    """(model, tokenizer) of ``--model name=path``: an HF model directory, a built-in ``thinktwice:`` name, or a
    ``.ckpt`` written by ``thinktwice fit`` (its model rebuilt from the checkpoint's model path, then its weights
    loaded; LoRA adapters merged into the base)."""
    flag = f"--model {name}={path}"
    local = Path(path).expanduser()
    if local.suffix == ".ckpt" or local.is_file():
        return _load_checkpoint(flag, local, dtype)
    check_model_name_or_path(path, flag=f"--model {name}")
    resolved = resolve_model_path(path)
    return load_causal_lm(resolved, dtype=dtype), load_tokenizer(resolved)


def _load_checkpoint(flag: str, path: Path, dtype: str) -> tuple[Any, Any]:
    if path.is_dir():
        raise UserError(
            f"{flag} is a sharded (FSDP2) checkpoint directory, which this command does not read: give the HF export "
            "of that run (its hf_model folder) or a checkpoint of a single-device or DDP run"
        )
    if not path.is_file():
        raise UserError(f"{flag}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise UserError(f"{flag} is not a readable checkpoint ({type(error).__name__}: {error})") from None
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    base_path = hparams.get("model_name_or_path")
    if not base_path or not isinstance(state, dict):
        raise UserError(f"{flag} is not a checkpoint written by thinktwice fit (no model_name_or_path and state_dict)")
    if hparams.get("quantization"):
        raise UserError(
            f"{flag} holds the LoRA adapters of a QLoRA run (4-bit base), which this command does not load: give the "
            "merged HF export of that run (its hf_model folder)"
        )
    check_model_name_or_path(base_path, flag=f"{flag} (the model.model_name_or_path it was trained from)")
    resolved = resolve_model_path(base_path)
    lora = LoraSettings(**hparams["lora"]) if hparams.get("lora") else None
    model = load_causal_lm(resolved, dtype=dtype, lora=lora, attn_implementation=hparams.get("attn_implementation"))
    weights = {key.removeprefix("policy."): value for key, value in state.items() if key.startswith("policy.")}
    if lora is not None:
        from peft import set_peft_model_state_dict

        ours = set(_adapter_names(model))
        _check_fit(flag, base_path, ours, set(weights))
        set_peft_model_state_dict(model, weights)
        model = model.merge_and_unload()
    else:
        _check_fit(flag, base_path, set(model.state_dict()), set(weights))
        model.load_state_dict(weights, strict=True)
    return model, load_tokenizer(resolved)


def _adapter_names(model: Any) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model))


def _check_fit(flag: str, base_path: str, ours: set[str], theirs: set[str]) -> None:
    missing, unknown = sorted(ours - theirs), sorted(theirs - ours)
    if missing or unknown:
        raise UserError(
            f"{flag}: its weights do not fit the model at its model.model_name_or_path={base_path} "
            f"({len(missing)} missing{f', e.g. {missing[0]}' if missing else ''}; {len(unknown)} unknown"
            f"{f', e.g. {unknown[0]}' if unknown else ''}): that path no longer holds the model it was trained from"
        )
