"""Tiny models built from configs (no downloads), their batches, and helpers that read an engine, shared by
the tests and by the worker scripts they launch (``from tiny import make_model, ...``)."""
from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

VOCAB = 64
_COMMON = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)

#: Architectures the core must support (issue: OPT, GPT-2, LLaMA, Qwen2, Qwen3, Mistral, Gemma, Phi),
#: plus others the generic partition handles, with tied and untied heads.
ARCHS: dict[str, dict] = {
    "opt": dict(model_type="opt", hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=0,
                bos_token_id=1, eos_token_id=2),
    "gpt2": dict(model_type="gpt2", n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64,
                 bos_token_id=1, eos_token_id=2),
    "llama": dict(model_type="llama", num_key_value_heads=1, **_COMMON),
    "llama-tied": dict(model_type="llama", num_key_value_heads=1, tie_word_embeddings=True, **_COMMON),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=1, **_COMMON),
    "qwen3": dict(model_type="qwen3", num_key_value_heads=1, head_dim=8, **_COMMON),
    "mistral": dict(model_type="mistral", num_key_value_heads=1, **_COMMON),
    "gemma": dict(model_type="gemma", num_key_value_heads=1, head_dim=8, **_COMMON),
    "phi": dict(model_type="phi", **_COMMON),
    "phi3": dict(model_type="phi3", **_COMMON),
    "gemma2": dict(model_type="gemma2", num_key_value_heads=1, head_dim=8, **_COMMON),
    "gpt_neox": dict(model_type="gpt_neox", **_COMMON),
    "bloom": dict(model_type="bloom", hidden_size=16, n_layer=2, n_head=2, vocab_size=VOCAB, pad_token_id=0),
    "falcon": dict(model_type="falcon", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                   vocab_size=VOCAB, pad_token_id=0),
    "olmo": dict(model_type="olmo", **_COMMON),
    "mixtral": dict(model_type="mixtral", num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                    **_COMMON),
    "stablelm": dict(model_type="stablelm", num_key_value_heads=2, **_COMMON),
    "gptj": dict(model_type="gptj", n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, rotary_dim=4,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "gemma3_text": dict(model_type="gemma3_text", num_key_value_heads=1, head_dim=8, **_COMMON),
    "qwen3_moe": dict(model_type="qwen3_moe", num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16, **_COMMON),
    "olmo2": dict(model_type="olmo2", **_COMMON),
    "cohere": dict(model_type="cohere", num_key_value_heads=1, logit_scale=1.0, **_COMMON),
    "granite": dict(model_type="granite", num_key_value_heads=1, **_COMMON),
    "starcoder2": dict(model_type="starcoder2", num_key_value_heads=1, **_COMMON),
    "smollm3": dict(model_type="smollm3", num_key_value_heads=1, **_COMMON),
    "glm": dict(model_type="glm", num_key_value_heads=1, head_dim=8, **_COMMON),
    "phimoe": dict(model_type="phimoe", num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, **_COMMON),
    "gpt_bigcode": dict(model_type="gpt_bigcode", n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "mpt": dict(model_type="mpt", d_model=16, n_layers=2, n_heads=2, vocab_size=VOCAB, max_seq_len=64),
}
CORE_ARCHS = ["opt", "gpt2", "llama", "llama-tied", "qwen2", "qwen3", "mistral", "gemma", "phi"]

_HEADS = {"causal": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification,
          "qa": AutoModelForQuestionAnswering}


def make_config(arch: str, **overrides):
    kwargs = dict(ARCHS[arch])
    model_type = kwargs.pop("model_type")
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def make_model(arch: str, head: str = "causal", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny randomly initialised model (deterministic in ``seed``)."""
    config = make_config(arch, **overrides)
    if head == "seq-cls":
        config.num_labels = 2
    torch.manual_seed(seed)
    model = _HEADS[head].from_config(config)
    return model.to(dtype)


def make_batch(head: str = "causal", batch: int = 4, length: int = 10, seed: int = 0, padded: bool = True) -> dict:
    """Token ids in [3, VOCAB) with the first row left-padded, and the head's targets."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
        ids[0, :3] = 0
    if head == "causal":
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if head == "seq-cls":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(batch) % 2}
    starts = torch.randint(3, length // 2, (batch,), generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "start_positions": starts, "end_positions": starts + 2}


def first_order_drop(updates) -> float:
    """How much ``updates`` lower the loss to first order: an update moves theta by -lr g z, and g is the
    directional derivative along z, so the loss falls by lr g^2 (summed over the updates)."""
    return sum(u.lr * u.projected_grad ** 2 for u in updates)


def masters(engine) -> torch.Tensor:
    """Every unit's master weights, concatenated (after applying pending updates)."""
    engine.flush()
    return torch.cat([unit.master.detach().cpu().reshape(-1) for unit in engine.units])
