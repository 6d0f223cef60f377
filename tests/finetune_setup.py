"""The tiny offline set-up of the ``zo2 finetune`` tests: a 2-layer LLaMA saved from a config, a
word-level tokenizer built here, and labelled review rows (seconds on a CPU, no hub)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from zo2 import tasks

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "dull", "awful", "boring", "weak", "poor"]
FILLER = ["the", "film", "plot", "was", "a", "movie", "cast", "very"]
TASK = tasks.ColumnTask({"neg": "negative", "pos": "positive"})


def rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` short reviews labelled neg/pos alternately, each with one telling word."""
    rng = random.Random(seed)
    made = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.choices(FILLER, k=rng.randint(1, 8)) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        made.append({"text": " ".join(words) + f" {i}", "label": label, "id": i})
    return made


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    word_level = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = POSITIVE + NEGATIVE + FILLER + [str(i) for i in range(100)] + [
        "Review:", "Sentiment:", "positive", "negative", "terrible", "It", "is", "Question", "Answer", ":"]
    word_level.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[EOS]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows(60)))
    return path


def finetune_args(model_dir: Path, data_file: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--train-file", str(data_file), "--label-words", "neg=negative",
            "pos=positive", "--steps", "3", "--batch-size", "4", "--train-examples", "24", "--eval-examples", "10",
            "--lr", "1e-3", "--working-device", "cpu", *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")
