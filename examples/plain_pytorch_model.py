"""Zeroth-order training of a model that is not a transformers model: a nanoGPT-style character LM.

The engine needs three things from such a model: its blocks in an ``nn.ModuleList`` (found as the list
holding most parameters), an objective (what to minimise, from the model's output), and a tiny probe
batch of keyword arguments of its forward (to find the units). Everything else works as for Hugging
Face models: offloading, every method, checkpoints of the update log.

    python examples/plain_pytorch_model.py                  # 300 steps of MeZO on a tiny text, on the CPU
    python examples/plain_pytorch_model.py --method fzoo --offload --steps 100
"""
from __future__ import annotations

import argparse
import logging
import math

import torch
from torch import nn
from torch.nn import functional as F

import zo2

TEXT = ("to be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. ") * 8


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyGPT(nn.Module):
    """Token and position embeddings, a list of blocks, a final norm and a head tied to the embedding."""

    def __init__(self, vocab: int, width: int = 64, depth: int = 4, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight
        for module in self.modules():  # GPT-2's initialisation: small weights, zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        # positions of shape (1, T): an input without a batch dimension is shared by every part of a walk
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1], device=idx.device)[None])
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # logits (B, T, vocab)


@zo2.objective(targets=("targets",))
def next_token_loss(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of tokens (the objective's (sum, count) form)."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), reduction="sum")
    return total, torch.tensor(batch["targets"].numel())


def batches(data: torch.Tensor, size: int, length: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - length - 1, (size,), generator=generator)
        chunk = torch.stack([data[s:s + length + 1] for s in starts.tolist()])
        yield {"idx": chunk[:, :-1], "targets": chunk[:, 1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--method", default="mezo-sgd", choices=list(zo2.METHODS))
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--offload", action="store_true", help="stream the blocks through the working device")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    vocab = sorted(set(TEXT))
    data = torch.tensor([vocab.index(c) for c in TEXT])
    torch.manual_seed(0)
    model = TinyGPT(len(vocab))
    config = zo2.ZOConfig(method=args.method, lr=args.lr, eps=1e-3, zo2=args.offload, working_device="cpu")
    engine = zo2.ZOEngine(model, config, objective=next_token_loss,
                          probe_inputs={"idx": torch.zeros(1, 4, dtype=torch.long)})
    stream = batches(data, size=8, length=32, seed=0)
    held_out = next(batches(data, size=32, length=32, seed=1))
    for step in range(args.steps):
        result = engine.step(next(stream))
        if step % 50 == 0 or step == args.steps - 1:
            logits = engine.forward(idx=held_out["idx"])
            total, count = next_token_loss(logits, held_out)
            logging.info("step %4d  train loss %.4f  held-out loss %.4f (uniform: %.4f)", step, result.loss,
                         float(total / count), math.log(len(vocab)))


if __name__ == "__main__":
    main()
