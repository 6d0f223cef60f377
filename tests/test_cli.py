"""Tests of the default job: data loading and split, prompts and training labels, candidate scoring,
and ``zo2 train`` end to end on a tiny LLaMA with a word-level tokenizer built here (offline, seconds)."""
from __future__ import annotations

import bz2
import csv
import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from zo2 import cli, tasks
from zo2.tasks import IGNORE_INDEX, Example, PromptTask

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "dull", "awful", "boring", "weak", "poor"]
FILLER = ["the", "film", "plot", "was", "a", "movie", "cast", "very"]
TASK = PromptTask(label_names=("neg", "pos"), candidates=(" negative", " positive"))


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.choices(FILLER, k=rng.randint(1, 8)) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rows.append({"text": " ".join(words) + f" {i}", "label": label, "id": i})
    return rows


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    word_level = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = POSITIVE + NEGATIVE + FILLER + [str(i) for i in range(100)] + [
        "Review:", "Sentiment:", "positive", "negative", "neutral", "very", "not", "It", "is"]
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


@pytest.fixture(scope="module")
def tiny_model(model_dir: Path) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _rows(60)))
    return path


def _forward(model):
    return lambda batch: model(**batch, use_cache=False)


# ------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".csv.bz2"])
def test_read_records_formats(tmp_path: Path, suffix: str) -> None:
    rows = [{"text": "a, \"quoted\"\nline", "label": "pos"}, {"text": "b", "label": "neg"}]
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    else:
        opener = bz2.open if suffix.endswith(".bz2") else open
        with opener(path, "wt", newline="") as stream:
            writer = csv.DictWriter(stream, ["text", "label"], delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    assert tasks.read_records(path) == rows


def test_read_records_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        tasks.read_records(tmp_path / "missing.csv")
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(tasks.TaskError, match="unknown data format"):
        tasks.read_records(tmp_path / "data.parquet")
    (tmp_path / "data.json").write_text('{"text": "a"}')
    with pytest.raises(tasks.TaskError, match="list of objects"):
        tasks.read_records(tmp_path / "data.json")


def test_make_examples_drops_and_validates() -> None:
    records = [{"text": "a", "label": "pos"}, {"text": "b", "label": "other"}, {"text": " ", "label": "neg"},
               {"text": "a", "label": "neg"}, {"text": "c", "label": "neg"}]
    assert tasks.make_examples(records, TASK) == [Example("a", 1), Example("c", 0)]
    with pytest.raises(tasks.TaskError, match=r"'txt' is not in the data; its columns are \['text', 'label'\]"):
        tasks.make_examples(records, TASK, text_column="txt")
    with pytest.raises(tasks.TaskError, match="no usable rows"):
        tasks.make_examples(records, PromptTask(("x", "y"), (" x", " y")))


def test_rotten_tomatoes_drops_plot_summaries() -> None:
    records = tasks.read_records(tasks.rotten_tomatoes_path())
    categories = [r["category"] for r in records]
    assert (categories.count("fresh"), categories.count("rotten"), categories.count("plot")) == (7403, 5405, 1097)
    examples = tasks.make_examples(records, tasks.ROTTEN_TOMATOES, "text", "category")
    reviews = {r["text"].strip() for r in records if r["category"] != "plot"}
    plots = {r["text"].strip() for r in records if r["category"] == "plot"}
    texts = {e.text for e in examples}
    assert len(examples) == len(texts) == len(reviews) and not texts & plots
    fresh = {r["text"].strip() for r in records if r["category"] == "fresh"}
    assert all((e.label == 1) == (e.text in fresh) for e in examples[:500])


def test_split_is_deterministic_balanced_and_disjoint() -> None:
    examples = [Example(f"text {i}", int(i % 3 == 0)) for i in range(300)]  # 100 of class 1, 200 of class 0
    train, eval_set = tasks.split_examples(examples, 2, eval_size=40, train_size=100, seed=1)
    assert (len(train), len(eval_set)) == (100, 40)
    assert not {e.text for e in train} & {e.text for e in eval_set}
    assert sum(e.label for e in eval_set) == 20 and sum(e.label for e in train) == 50
    assert tasks.split_examples(examples, 2, 40, 100, seed=1) == (train, eval_set)
    assert tasks.split_examples(examples, 2, 40, 100, seed=2)[1] != eval_set
    train, _ = tasks.split_examples(examples, 2, eval_size=40, train_size=10_000, seed=1)
    assert len(train) == 260
    with pytest.raises(tasks.TaskError, match="leave none"):
        tasks.split_examples(examples, 2, eval_size=300, train_size=1, seed=0)


def test_training_batches_cycle_through_epochs() -> None:
    examples = [Example(str(i), 0) for i in range(10)]
    batches = tasks.training_batches(examples, 4, seed=0)
    first = [next(batches) for _ in range(5)]
    assert all(len(b) == 4 for b in first)
    assert {e.text for b in first[:2] for e in b} | {e.text for e in first[2][:2]} == {str(i) for i in range(10)}
    again = tasks.training_batches(examples, 4, seed=0)
    assert [next(again) for _ in range(5)] == first
    with pytest.raises(tasks.TaskError):
        tasks.training_batches([], 4, seed=0)


# -------------------------------------------------------------------------------- prompts, labels
def test_task_validation() -> None:
    assert TASK.prompt("nice {x}") == "Review: nice {x}\nSentiment:"
    with pytest.raises(tasks.TaskError, match="placeholder"):
        PromptTask(("a", "b"), (" a", " b"), template="no slot")
    with pytest.raises(tasks.TaskError, match="one candidate per class"):
        PromptTask(("a", "b"), (" a",))
    with pytest.raises(tasks.TaskError, match="distinct"):
        PromptTask(("a", "b"), (" a", " a"))


def test_training_batch_supervises_only_the_label_word(tokenizer) -> None:
    encoder = tasks.PromptEncoder(tokenizer, TASK, max_length=16)
    examples = [Example("good film", 1), Example("the plot was very dull and boring", 0)]
    batch = encoder.training_batch(examples)
    candidate = {k: tokenizer(c, add_special_tokens=False)["input_ids"] for k, c in enumerate(TASK.candidates)}
    for row, example in enumerate(examples):
        length = int(batch["attention_mask"][row].sum())
        prompt = tokenizer(TASK.prompt(example.text))["input_ids"]
        assert batch["input_ids"][row, :length].tolist() == prompt + candidate[example.label]
        assert batch["attention_mask"][row, :length].all() and not batch["attention_mask"][row, length:].any()
        supervised = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert supervised == [length - 1]
        assert batch["labels"][row, length - 1] == candidate[example.label][0]


def test_long_prompts_are_cut_from_the_left(tokenizer) -> None:
    encoder = tasks.PromptEncoder(tokenizer, PromptTask(("neg", "pos"), (" not good", " very good")), max_length=8)
    ids = encoder.prompt_ids("the plot was a very dull boring film")
    assert len(ids) == 6 and tokenizer.decode(ids[-2:]) == "Sentiment :"
    batch = encoder.training_batch([Example("the plot was a very dull boring film", 1)])
    assert batch["input_ids"].shape == (1, 8) and (batch["labels"] != IGNORE_INDEX).sum() == 2
    with pytest.raises(tasks.TaskError, match="no room"):
        tasks.PromptEncoder(tokenizer, TASK, max_length=1)
    with pytest.raises(tasks.TaskError, match="identical"):
        tasks.PromptEncoder(tokenizer, PromptTask(("a", "b"), (" zzz", " qqq")), max_length=8)  # both [UNK]


def test_hf_loss_is_the_label_word_cross_entropy(tokenizer, tiny_model) -> None:
    encoder = tasks.PromptEncoder(tokenizer, PromptTask(("neg", "pos"), (" not good", " positive")), 32)
    batch = encoder.training_batch([Example("good film", 1), Example("dull", 0), Example("a very dull film", 0)])
    with torch.no_grad():
        output = tiny_model(**batch)
    logprobs = tasks.sequence_logprobs(output.logits, batch["labels"])
    supervised = int((batch["labels"] != IGNORE_INDEX).sum())
    assert supervised == 5
    torch.testing.assert_close(output.loss, -logprobs.sum() / supervised)


# ------------------------------------------------------------------------------------- scoring
def _bigram_forward(table: torch.Tensor):
    """A stub LM whose next-token logits depend only on the current token."""
    return lambda batch: SimpleNamespace(logits=table[batch["input_ids"]])


def test_scoring_reads_each_rows_last_real_token(tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    task = PromptTask(("neg", "pos"), (" negative", " positive"), template="{text}")
    table = torch.zeros(len(vocab), len(vocab))
    for word in POSITIVE:
        table[vocab[word], vocab["positive"]] = 5.0
    for word in NEGATIVE:
        table[vocab[word], vocab["negative"]] = 5.0
    table[vocab["[PAD]"], vocab["negative"]] = 50.0  # reading a padded position would answer "negative"
    examples = [Example("the film was fun", 1), Example("dull", 0), Example("a great", 1), Example("poor cast bad", 0)]
    encoder = tasks.PromptEncoder(tokenizer, task, max_length=16)
    assert encoder.single_token
    scores = tasks.candidate_scores(_bigram_forward(table), encoder, examples, batch_size=4)
    assert scores.argmax(dim=1).tolist() == [1, 0, 1, 0]
    result = tasks.evaluate(_bigram_forward(table), encoder, examples, batch_size=3)
    assert (result.accuracy, result.predicted, result.size) == (1.0, (2, 2), 4)
    torch.testing.assert_close(result.loss, float(-scores[torch.arange(4), torch.tensor([1, 0, 1, 0])].mean()))


def test_multi_token_scores_sum_the_candidate_tokens(tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    task = PromptTask(("neg", "pos"), (" not good", " very good"), template="{text}")
    table = torch.randn(len(vocab), len(vocab), generator=torch.Generator().manual_seed(0))
    encoder = tasks.PromptEncoder(tokenizer, task, max_length=16)
    assert not encoder.single_token
    examples = [Example("fun", 1), Example("the plot was dull", 0)]
    scores = tasks.candidate_scores(_bigram_forward(table), encoder, examples, batch_size=2)
    logp = torch.log_softmax(table, dim=-1)
    for row, last in enumerate(["fun", "dull"]):
        for k, first in enumerate(["not", "very"]):
            expected = logp[vocab[last], vocab[first]] + logp[vocab[first], vocab["good"]]
            torch.testing.assert_close(scores[row, k], expected)


@pytest.mark.parametrize("candidates", [(" negative", " positive"), (" not good", " very good")])
def test_padded_batches_score_like_single_examples(tokenizer, tiny_model, candidates) -> None:
    encoder = tasks.PromptEncoder(tokenizer, PromptTask(("neg", "pos"), candidates), max_length=32)
    examples = [Example(row["text"], int(row["label"] == "pos")) for row in _rows(7)]
    with torch.no_grad():
        batched = tasks.candidate_scores(_forward(tiny_model), encoder, examples, batch_size=4)
        alone = tasks.candidate_scores(_forward(tiny_model), encoder, examples, batch_size=1)
        selected = tasks.candidate_scores(_forward(tiny_model), encoder, examples, batch_size=4, select_logits=True)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(selected, alone, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- the CLI
def _train_args(model_dir: Path, data_file: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--data", str(data_file), "--label-words", "neg=negative", "pos=positive",
            "--steps", "3", "--batch-size", "4", "--train-examples", "24", "--eval-examples", "10",
            "--lr", "1e-3", "--working-device", "cpu", *extra]


def test_cli_end_to_end(model_dir: Path, data_file: Path, tmp_path: Path, tokenizer, capsys) -> None:
    out = tmp_path / "out"
    assert cli.main(["train", *_train_args(model_dir, data_file, "--eval-every", "2", "--output-dir", str(out))]) == 0
    printed = capsys.readouterr().out
    assert "accuracy before:" in printed and "steps: 3 x batch 4, lr 0.001" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["train_examples"], summary["eval_examples"]) == (3, 24, 10)
    assert [e["step"] for e in summary["evals"]] == [0, 2, 3]
    assert summary["accuracy_after"] == summary["evals"][-1]["accuracy"]
    assert summary["eval_loss_after"] == summary["evals"][-1]["loss"] > 0
    assert [h["step"] for h in summary["history"]] == [1, 2, 3]
    assert summary["label_words"] == {"neg": " negative", "pos": " positive"}
    assert summary["zo_config"]["lr"] == 1e-3 and summary["zo_config"]["zo2"] is False

    trained = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    examples = tasks.make_examples(tasks.read_records(data_file), TASK)
    _, eval_set = tasks.split_examples(examples, 2, 10, 24, seed=0)
    with torch.no_grad():
        result = tasks.evaluate(_forward(trained), tasks.PromptEncoder(reloaded_tokenizer, TASK, 64), eval_set, 32)
    assert result.accuracy == summary["accuracy_after"]
    assert result.loss == pytest.approx(summary["eval_loss_after"], rel=1e-5)


def test_cli_train_is_the_default_command_and_offloads(model_dir: Path, data_file: Path, capsys) -> None:
    assert cli.main(_train_args(model_dir, data_file, "--offload", "--steps", "1")) == 0
    assert "steps: 1 x batch 4" in capsys.readouterr().out


def test_cli_label_values_are_the_default_words(model_dir: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "data.csv"
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, ["review", "sentiment"])
        writer.writeheader()
        writer.writerows({"review": r["text"], "sentiment": {"pos": "positive", "neg": "negative"}[r["label"]]}
                         for r in _rows(30))
    args = ["--model", str(model_dir), "--data", str(path), "--text-column", "review", "--label-column",
            "sentiment", "--steps", "1", "--batch-size", "2", "--eval-examples", "6", "--template", "{text}\\nIt is"]
    assert cli.main(args) == 0
    assert "accuracy before" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--data", "missing.csv"], "data file missing.csv does not exist"),
    (["--text-column", "body"], "'body' is not in the data"),
    (["--label-words", "neg=negative", "pos=negative"], "distinct"),
    (["--eval-examples", "60"], "leave none"),
])
def test_cli_reports_bad_inputs(model_dir: Path, data_file: Path, capsys, extra, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*_train_args(model_dir, data_file), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "must be an integer > 0"),
    (["--lr", "-1"], "must be a finite number > 0"),
    (["--label-words", "positive"], "expected LABEL=WORD"),
    (["--template", "no slot"], "placeholder"),
])
def test_cli_rejects_bad_flags(capsys, extra, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_missing_model_folder(tmp_path: Path, data_file: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(_train_args(tmp_path / "nowhere", data_file))
    assert "no such folder" in capsys.readouterr().err


def test_python_dash_m_help() -> None:
    result = subprocess.run([sys.executable, "-m", "zo2", "train", "--help"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0 and "--label-words" in result.stdout and "--offload" in result.stdout


def test_embedded_model_is_loaded_from_the_cache(model_dir: Path, tmp_path: Path, monkeypatch, tokenizer,
                                                 tiny_model) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    target = cli.cache_dir() / cli.EMBEDDED_MODEL
    assert target == tmp_path / "zo2" / cli.EMBEDDED_MODEL
    cli._save_atomically(tiny_model, tokenizer, target)
    cli._save_atomically(tiny_model, tokenizer, target)  # a second writer loses the race quietly
    assert [p.name for p in target.parent.iterdir()] == [cli.EMBEDDED_MODEL]
    loaded_tokenizer, model = cli.load_embedded_model(torch.float32)
    assert model.config.hidden_size == 32 and loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
