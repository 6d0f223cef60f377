"""A GPT-2-style decoder in plain PyTorch, with ZO2's nanoGPT names: ``GPTConfig``, the presets of
``GPTConfigs`` and ``GPT(config)``, whose ``forward(idx, pos, targets=None)`` takes the positions explicitly.

Written for trying ZO ideas on a model whose whole code fits on a screen; zo2 trains it like any other
model (``ZOEngine(model, config, probe_inputs={"idx": ..., "pos": ...})``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    """Shape of a :class:`GPT`."""

    block_size: int = 1024
    """Longest sequence (rows of the position embedding)."""
    vocab_size: int = 50304
    """Vocabulary size (GPT-2's 50257 rounded up to a multiple of 64)."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads (must divide ``n_embd``)."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability (ZO steps run in eval mode, where it is off)."""
    bias: bool = True
    """Biases in the linear layers and layer norms, as GPT-2."""


class GPTConfigs:
    """The presets ZO2 names: GPT-2 sizes and OPT-sized GPTs (``getattr(GPTConfigs(), "opt_13b")``)."""

    gpt2 = GPTConfig(n_layer=12, n_head=12, n_embd=768)
    gpt2_medium = GPTConfig(n_layer=24, n_head=16, n_embd=1024)
    gpt2_large = GPTConfig(n_layer=36, n_head=20, n_embd=1280)
    gpt2_xl = GPTConfig(n_layer=48, n_head=25, n_embd=1600)
    opt_1_3b = GPTConfig(n_layer=24, n_head=32, n_embd=2048, block_size=2048)
    opt_2_7b = GPTConfig(n_layer=32, n_head=32, n_embd=2560, block_size=2048)
    opt_6_7b = GPTConfig(n_layer=32, n_head=32, n_embd=4096, block_size=2048)
    opt_13b = GPTConfig(n_layer=40, n_head=40, n_embd=5120, block_size=2048)
    opt_30b = GPTConfig(n_layer=48, n_head=56, n_embd=7168, block_size=2048)
    opt_66b = GPTConfig(n_layer=64, n_head=72, n_embd=9216, block_size=2048)
    opt_175b = GPTConfig(n_layer=96, n_head=96, n_embd=12288, block_size=2048)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with one fused q/k/v projection."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError(f"GPTConfig.n_head={config.n_head} must divide n_embd={config.n_embd}")
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        heads = self.qkv(x).view(batch, length, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(heads[0], heads[1], heads[2], is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm residual block: attention, then a 4x GELU MLP."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias),
                                 nn.Dropout(config.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's model: token and position embeddings, ``n_layer`` blocks, a final norm and an untied head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd), wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        for name, param in self.named_parameters():  # GPT-2's init: N(0, 0.02), residual outputs scaled down
            if param.dim() < 2:
                continue
            depth_scale = math.sqrt(2 * config.n_layer) if name.endswith(("proj.weight", "mlp.2.weight")) else 1.0
            nn.init.normal_(param, mean=0.0, std=0.02 / depth_scale)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, pos: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits of every position, mean cross-entropy of ``logits`` against ``targets`` or None).

        ``idx``: (B, T) token ids; ``pos``: their positions, (T,), (1, T) (shared by the batch) or (B, T);
        ``targets``: (B, T) ids each position should predict (-1 is ignored), as nanoGPT aligns them."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of {idx.shape[1]} tokens, longer than block_size={self.config.block_size}")
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss
