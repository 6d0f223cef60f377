"""The task suite: MeZO's templates on rows in each Hugging Face dataset's schema, candidate scoring and
greedy answers checked against plain per-example model calls, LM/instruction data, file loading,
column errors and the training batch order. A tiny LLaMA and a byte-level BPE tokenizer trained on the
fixtures make every text tokenisable offline."""
from __future__ import annotations

import bz2
import csv
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from zo2 import tasks
from zo2.tasks import IGNORE_INDEX, Example

PASSAGE = "The Eiffel Tower is in Paris. It was finished in 1889 and is 330 metres tall."
#: One row per task in its Hub dataset's schema, and what MeZO's template makes of it:
#: (row, prompt, candidates, label) for classification, (row, prompt, answers) for generation.
FIXTURES: dict[str, tuple] = {
    "sst2": ({"sentence": "a gripping , funny film ", "label": 1, "idx": 0},
             "a gripping , funny film It was", (" terrible", " great"), 1),
    "rte": ({"premise": PASSAGE, "hypothesis": "The tower is in Rome.", "label": 1, "idx": 0},
            f"{PASSAGE}\nDoes this mean that \"The tower is in Rome.\" is true? Yes or No?\n", ("Yes", "No"), 1),
    "cb": ({"premise": "It may rain.", "hypothesis": "It rains.", "label": 2, "idx": 0},
           "Suppose It may rain. Can we infer that \"It rains.\"? Yes, No, or Maybe?\n", ("Yes", "No", "Maybe"), 2),
    "boolq": ({"question": "is the eiffel tower in paris", "passage": PASSAGE, "label": 1, "idx": 0},
              f"{PASSAGE} Is the eiffel tower in paris?\n", ("No", "Yes"), 1),
    "wsc": ({"text": "Mark told Pete many lies about himself.", "span1_index": 0, "span2_index": 5,
             "span1_text": "Mark", "span2_text": "Himself", "label": 1, "idx": 0},
            "Mark told Pete many lies about himself.\nIn the previous sentence, does the pronoun \"himself\" refer to "
            "Mark? Yes or No?\n", ("No", "Yes"), 1),
    "wic": ({"word": "bank", "sentence1": "He sat on the bank.", "sentence2": "The bank closed.", "start1": 14,
             "start2": 4, "end1": 18, "end2": 8, "label": 0, "idx": 0},
            "Does the word \"bank\" have the same meaning in these two sentences? Yes, No?\nHe sat on the bank.\n"
            "The bank closed.\n", ("No", "Yes"), 0),
    "multirc": ({"paragraph": PASSAGE, "question": "How tall is it?", "answer": "330 metres",
                 "idx": {"paragraph": 0, "question": 0, "answer": 0}, "label": 1},
                f"{PASSAGE}\nQuestion: How tall is it?\nI found this answer \"330 metres\". Is that correct? Yes or "
                "No?\n", ("No", "Yes"), 1),
    "copa": ({"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
              "choice2": "I ran to the shop.", "question": "cause", "label": 0, "idx": 0},
             "The man broke his toe because", (" he dropped a hammer on his foot.", " I ran to the shop."), 0),
    "record": ({"passage": PASSAGE, "query": "@placeholder is in Paris.", "entities": ["Eiffel Tower", "Paris",
                "Eiffel Tower"], "entity_spans": {"text": [], "start": [], "end": []}, "answers": ["Eiffel Tower"],
                "idx": {"passage": 0, "query": 0}},
               f"{PASSAGE}\n@placeholder is in Paris.\nQuestion: what is the \"@placeholder\"\nAnswer:",
               (" Eiffel Tower", " Paris"), 0),
    "squad": ({"id": "1", "title": "Eiffel Tower", "context": PASSAGE, "question": " When was it finished? ",
               "answers": {"text": ["1889", "in 1889"], "answer_start": [48, 45]}},
              f"Title: Eiffel Tower\nContext: {PASSAGE}\nQuestion: When was it finished?\nAnswer:", ("1889", "in 1889")),
    "drop": ({"section_id": "s", "query_id": "q", "passage": PASSAGE, "question": "How tall is the tower?",
              "answers_spans": {"spans": ["330 metres"], "types": ["span"]}},
             f"Passage: {PASSAGE}\nQuestion: How tall is the tower?\nAnswer:", ("330 metres",)),
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE: any text tokenises; merges learnt from the fixtures keep candidates short."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [json.dumps(row) for row, *_ in FIXTURES.values()] + [PASSAGE, "Yes No Maybe great terrible"] * 3
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


def _forward(model):
    @torch.no_grad()
    def forward(batch):
        return model(**batch, use_cache=False)
    return forward


def _alone_mean_logprob(model, ids: list[int], n: int) -> float:
    """Mean log-probability of the last ``n`` tokens of ``ids``, from one unpadded forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return float(sum(logp[t - 1, ids[t]] for t in range(len(ids) - n, len(ids))) / n)


# --------------------------------------------------------------------------------- templates
def test_every_registered_task_has_a_fixture() -> None:
    assert set(tasks.TASKS) == set(FIXTURES)
    assert {s.kind for s in tasks.TASKS.values()} == {"classification", "generation"}
    assert all(s.hub_path for s in tasks.TASKS.values())


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_mezo_templates(name: str) -> None:
    spec = tasks.get_task(name)
    row, prompt, *expected = FIXTURES[name]
    example = spec.render(row)
    assert example.prompt == prompt
    if spec.kind == "classification":
        assert (example.candidates, example.label) == tuple(expected)
        assert spec.metric == "accuracy"
    else:
        assert (example.answers, example.candidates, example.target) == (expected[0], (), expected[0][0])
        assert spec.metric == "f1"


def test_rows_without_a_usable_label_are_dropped() -> None:
    assert tasks.get_task("rte").render({"premise": "a", "hypothesis": "b", "label": -1}) is None  # test split
    row = dict(FIXTURES["record"][0], answers=["Berlin"])
    assert tasks.get_task("record").render(row) is None
    with pytest.raises(tasks.TaskError, match="unknown task 'sst5'; known tasks: sst2, rte"):
        tasks.get_task("sst5")


# ----------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("name", [n for n in sorted(FIXTURES) if tasks.TASKS[n].kind == "classification"])
def test_candidate_scores_match_single_unpadded_forwards(name, tmp_path, tokenizer, model) -> None:
    row = FIXTURES[name][0]
    other = {k: v + " Really." if k in ("premise", "passage", "paragraph", "sentence", "sentence1", "text") else v for k, v in row.items()}
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [row, other]))
    examples = tasks.make_examples(tasks.read_records(path), tasks.get_task(name))
    assert len(examples) == 2
    encoder = tasks.PromptEncoder(tokenizer, max_length=256)
    scores = tasks.candidate_scores(_forward(model), encoder, examples, batch_size=2)
    assert len(scores) == len(examples)
    for example, score in zip(examples, scores):
        for k, candidate in enumerate(example.candidates):
            ids = encoder.piece_ids(candidate)
            expected = _alone_mean_logprob(model, encoder.prompt_ids(example) + ids, len(ids))
            assert float(score[k]) == pytest.approx(expected, abs=1e-4)
    result = tasks.evaluate("classification", _forward(model), encoder, examples, batch_size=1)
    predicted = [int(s.argmax()) for s in scores]
    assert result["accuracy"] == sum(p == e.label for p, e in zip(predicted, examples)) / len(examples)
    assert result["loss"] == pytest.approx(-sum(float(s[e.label]) for s, e in zip(scores, examples)) / 2, abs=1e-5)


def test_single_token_label_words_take_one_forward_per_example(tokenizer, model) -> None:
    task = tasks.ColumnTask({"0": "terrible", "1": "great"}, template="{text} It was")
    examples = [task.render({"text": t, "label": lab}) for t, lab in [("good", 1), ("a very long bad film", 0)]]
    encoder = tasks.PromptEncoder(tokenizer, max_length=64)
    assert encoder.shares_single_token_candidates(examples)
    calls = []
    forward = _forward(model)
    scores = tasks.candidate_scores(lambda b: calls.append(b["input_ids"].shape) or forward(b), encoder, examples, 2)
    assert calls == [(2, max(len(encoder.prompt_ids(e)) for e in examples))]
    assert len(scores) == len(examples)
    for example, score in zip(examples, scores):
        for k, candidate in enumerate(example.candidates):
            ids = encoder.prompt_ids(example) + encoder.piece_ids(candidate)
            assert float(score[k]) == pytest.approx(_alone_mean_logprob(model, ids, 1), abs=1e-4)


def test_identical_candidates_are_refused(tokenizer, model) -> None:
    encoder = tasks.PromptEncoder(tokenizer, max_length=64)
    example = Example("x", (" Yes", " Yes"), 0)
    with pytest.raises(tasks.TaskError, match="empty or identical"):
        tasks.candidate_scores(_forward(model), encoder, [example], 1)


@pytest.mark.parametrize("name", ["squad", "drop"])
def test_greedy_answers_match_generate(name, tokenizer, model) -> None:
    example = tasks.get_task(name).render(FIXTURES[name][0])
    encoder = tasks.PromptEncoder(tokenizer, max_length=256)
    short = Example("Title: x\nAnswer:", answers=("1889",))
    answers = tasks.greedy_answers(_forward(model), encoder, [example, short], batch_size=2, max_new_tokens=6)
    assert len(answers) == 2
    for ex, answer in zip([example, short], answers):
        prompt = torch.tensor([encoder.prompt_ids(ex, 6)])
        with torch.no_grad():
            generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, prompt.shape[1]:]
        text = tokenizer.decode(generated, skip_special_tokens=True)
        assert answer == text.strip().split("\n")[0].strip()


def test_exact_match_and_f1() -> None:
    assert tasks.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert tasks.answer_f1("in 1889", "1889") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert tasks.answer_f1("Paris", "Rome") == 0.0 and tasks.answer_f1("", "") == 1.0


# --------------------------------------------------------------------------------- LM, batches
def test_training_batch_supervises_only_the_continuation(tokenizer) -> None:
    encoder = tasks.PromptEncoder(tokenizer, max_length=256)
    spec = tasks.get_task("copa")
    example = spec.render(FIXTURES["copa"][0])
    batch = encoder.training_batch([example, Example("short", (" a", " b"), 1)])
    for row, ex in enumerate([example, Example("short", (" a", " b"), 1)]):
        target, prompt = encoder.piece_ids(ex.target), encoder.prompt_ids(ex)
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == prompt + target
        assert batch["labels"][row, :length - len(target)].eq(IGNORE_INDEX).all()
        assert batch["labels"][row, length - len(target):length].tolist() == target
        assert batch["labels"][row, length:].eq(IGNORE_INDEX).all()


@pytest.mark.parametrize("side", tasks.TRUNCATION_SIDES)
def test_truncation_cuts_only_the_text_field(tokenizer, side) -> None:
    task = tasks.ColumnTask({"0": "terrible", "1": "great"}, template="Article: {text}\nIs it great?")
    text = " ".join([PASSAGE] * 4)
    long, short = task.render({"text": text, "label": 1}), task.render({"text": "It is in Paris.", "label": 0})
    encoder = tasks.PromptEncoder(tokenizer, max_length=40, truncate=side)
    assert encoder.prompt_ids(short, 1) == tokenizer(short.prompt)["input_ids"]  # what fits is never touched
    ids = encoder.prompt_ids(long, 1)
    assert encoder.prompt_length(long) > 39 >= len(ids)
    prompt = tokenizer.decode(ids)
    assert prompt.startswith("Article: ") and prompt.endswith("\nIs it great?")  # the template is whole
    kept = prompt.removeprefix("Article: ").removesuffix("\nIs it great?")
    assert kept and (text.startswith(kept) if side == "right" else text.endswith(kept)) and len(kept) < len(text)
    more = text[:len(kept) + 1] if side == "right" else text[-len(kept) - 1:]  # one more character does not fit
    assert len(tokenizer(f"Article: {more}\nIs it great?")["input_ids"]) > 39
    batch = encoder.training_batch([long, short])
    assert batch["input_ids"].shape[1] <= 40 and batch["input_ids"][0, :len(ids)].tolist() == ids
    assert batch["labels"][0, len(ids)].item() == encoder.piece_ids(" great")[0]  # the answer is whole
    report = encoder.truncation([long, short, long])
    assert report == {"examples": 3, "cut": 2, "tokens_cut_mean": encoder.prompt_length(long) - len(ids),
                      "tokens_cut_max": encoder.prompt_length(long) - len(ids)}


def test_truncation_of_registry_tasks_keeps_the_other_fields(tokenizer) -> None:
    row = dict(FIXTURES["rte"][0], premise=" ".join([PASSAGE] * 5))
    example = tasks.get_task("rte").render(row)
    question = "\nDoes this mean that \"The tower is in Rome.\" is true? Yes or No?\n"
    encoder = tasks.PromptEncoder(tokenizer, max_length=60)
    prompt = tokenizer.decode(encoder.prompt_ids(example, 1))
    assert prompt.endswith(question) and row["premise"].startswith(prompt.removesuffix(question))
    with pytest.raises(tasks.TaskError, match="a prompt without its text still takes"):
        tasks.PromptEncoder(tokenizer, max_length=12).truncation([example])
    with pytest.raises(tasks.TaskError, match="truncate='middle'"):
        tasks.PromptEncoder(tokenizer, max_length=12, truncate="middle")


def test_long_responses_are_cut_after_a_whole_prompt(tokenizer) -> None:
    task = tasks.TextTask(prompt_column="prompt", name="instruction")
    example = task.render({"prompt": "Name the tower.", "text": PASSAGE * 3})
    encoder = tasks.PromptEncoder(tokenizer, max_length=24)
    batch = encoder.training_batch([example])
    prompt = tokenizer("Name the tower.\n")["input_ids"]
    assert batch["input_ids"].shape == (1, 24) and batch["input_ids"][0, :len(prompt)].tolist() == prompt
    assert batch["labels"][0, len(prompt):].tolist() == encoder.piece_ids(example.target)[:24 - len(prompt)]
    assert encoder.truncation([example])["cut"] == 1


def test_lm_and_instruction_data(tokenizer, model) -> None:
    rows = [{"prompt": "Name the tower.", "text": "The Eiffel Tower"}, {"prompt": "Where?", "text": "In Paris, 1889."}]
    lm, instruction = tasks.TextTask(), tasks.TextTask(prompt_column="prompt", name="instruction")
    encoder = tasks.PromptEncoder(tokenizer, max_length=64)
    plain = tasks.make_examples(rows, lm)
    batch = encoder.training_batch(plain)
    assert batch["labels"].ne(IGNORE_INDEX).sum() == batch["attention_mask"].sum()  # every token supervised
    prompted = tasks.make_examples(rows, instruction)
    assert prompted[0].prompt == "Name the tower.\n" and prompted[0].target == "The Eiffel Tower"
    for examples in (plain, prompted):
        batch = encoder.training_batch(examples)
        with torch.no_grad():
            expected = model(**batch).loss  # HF: mean over every supervised token of the batch
        result = tasks.evaluate("lm", _forward(model), encoder, examples, batch_size=1)
        assert result["loss"] == pytest.approx(float(expected), rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


# ------------------------------------------------------------------------------------- files
def test_parquet_and_column_errors(tmp_path: Path) -> None:
    rows = [{"review": "fine film", "stars": 5}, {"review": "dull", "stars": 1}, {"review": "ok", "stars": 3}]
    path = tmp_path / "reviews.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert tasks.read_records(path) == rows
    task = tasks.ColumnTask({"1": "bad", "5": "good"}, text_column="review", label_column="stars",
                            drop_unknown_labels=True)
    assert [(e.prompt, e.candidates, e.label) for e in tasks.make_examples(tasks.read_records(path), task)] == [
        ("Review: fine film\nSentiment:", (" bad", " good"), 1), ("Review: dull\nSentiment:", (" bad", " good"), 0)]
    with pytest.raises(tasks.TaskError, match=r"the text column 'text' is not in the data; its columns are \['review', 'stars'\]"):
        tasks.make_examples(rows, tasks.ColumnTask({"1": "bad", "5": "good"}, label_column="stars"))
    with pytest.raises(tasks.TaskError, match="task 'rte' needs the column 'premise'"):
        tasks.make_examples([{"text": "a", "label": 0}], tasks.get_task("rte"))
    with pytest.raises(tasks.TaskError, match="no usable rows"):
        tasks.make_examples(rows, tasks.ColumnTask({"x": "a", "y": "b"}, text_column="review", label_column="stars",
                                                   drop_unknown_labels=True))
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(tasks.TaskError, match="cannot parse it as parquet"):
        tasks.read_records(tmp_path / "broken.parquet")
    (tmp_path / "x.txt").write_text("text,label\n")
    with pytest.raises(tasks.TaskError, match="unknown data format '.txt'"):
        tasks.read_records(tmp_path / "x.txt")


def test_unknown_label_values_are_an_error_naming_them(caplog) -> None:
    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate(["positive", "negative", "neutral"] * 4)]
    typo = tasks.ColumnTask({"Positive": "positive", "negative": "negative", "neutral": "neutral"})
    with pytest.raises(tasks.TaskError) as error:
        tasks.make_examples(rows, typo)
    message = str(error.value)
    assert "'positive' (4 rows)" in message and "Positive=positive negative=negative neutral=neutral" in message
    assert "'Positive' matches no row" in message and "--drop-unknown-labels" in message
    dropping = tasks.ColumnTask(dict(typo.label_words), drop_unknown_labels=True)
    with caplog.at_level("WARNING"):
        examples = tasks.make_examples(rows, dropping)
    assert len(examples) == 8 and {e.label for e in examples} == {1, 2}
    assert "leaving out 4 rows whose label has no label word: 'positive' (4 rows)" in caplog.text
    assert "label words 'Positive' match no row" in caplog.text


def test_a_short_split_warns(caplog) -> None:
    examples = [Example(f"text {i}", (" a", " b"), i % 2) for i in range(10)]
    with caplog.at_level("WARNING"):
        train, _ = tasks.split_examples(examples, eval_size=4, train_size=100, seed=0)
    assert len(train) == 6 and "only 6 of the 10 examples are left for training" in caplog.text
    assert caplog.records[-1].levelname == "WARNING"


def test_column_task_validation() -> None:
    with pytest.raises(tasks.TaskError, match="placeholder"):
        tasks.ColumnTask({"a": "x", "b": "y"}, template="no slot")
    with pytest.raises(tasks.TaskError, match="exactly one"):
        tasks.ColumnTask({"a": "x", "b": "y"}, template="{text} and {text}")
    with pytest.raises(tasks.TaskError, match="at least two classes"):
        tasks.ColumnTask({"a": "x"})
    with pytest.raises(tasks.TaskError, match="distinct"):
        tasks.ColumnTask({"a": "x", "b": " x"})


def test_batch_order_is_a_pure_function_of_seed_and_step() -> None:
    first_epoch = [i for step in range(5) for i in tasks.batch_indices(10, 2, seed=3, step=step)]
    assert sorted(first_epoch) == list(range(10))
    assert tasks.batch_indices(10, 4, seed=3, step=2) == tasks.batch_indices(10, 4, seed=3, step=2)
    assert tasks.batch_indices(10, 4, seed=3, step=2)[:2] == first_epoch[8:10]  # positions 8, 9 of epoch 0
    assert tasks.batch_indices(10, 4, seed=4, step=0) != tasks.batch_indices(10, 4, seed=3, step=0)
    with pytest.raises(tasks.TaskError):
        tasks.batch_indices(0, 4, seed=0, step=0)


def test_split_is_deterministic_balanced_and_disjoint() -> None:
    examples = [Example(f"text {i}", (" a", " b"), int(i % 3 == 0)) for i in range(300)]
    train, eval_set = tasks.split_examples(examples, eval_size=40, train_size=100, seed=1)
    assert (len(train), len(eval_set)) == (100, 40)
    assert not {e.prompt for e in train} & {e.prompt for e in eval_set}
    assert sum(e.label for e in eval_set) == 20 and sum(e.label for e in train) == 50
    assert tasks.split_examples(examples, 40, 100, seed=1) == (train, eval_set)
    assert tasks.split_examples(examples, 40, 100, seed=2)[1] != eval_set
    with pytest.raises(tasks.TaskError, match="leave none"):
        tasks.split_examples(examples, eval_size=300, train_size=1, seed=0)
    assert tasks.subsample(examples, 5, seed=0) == tasks.subsample(examples, 5, seed=0) != examples[:5]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".csv.bz2"])
def test_read_records_text_formats(tmp_path: Path, suffix: str) -> None:
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
    with pytest.raises(FileNotFoundError):
        tasks.read_records(tmp_path / "missing.csv")
    (tmp_path / "data.json").write_text('{"text": "a"}')
    with pytest.raises(tasks.TaskError, match="list of objects"):
        tasks.read_records(tmp_path / "data.json")


def test_rotten_tomatoes_drops_plot_summaries() -> None:
    records = tasks.read_records(tasks.rotten_tomatoes_path())
    categories = [r["category"] for r in records]
    assert (categories.count("fresh"), categories.count("rotten"), categories.count("plot")) == (7403, 5405, 1097)
    examples = tasks.make_examples(records, tasks.ROTTEN_TOMATOES)
    reviews = {r["text"].strip() for r in records if r["category"] != "plot"}
    texts = {e.prompt for e in examples}
    assert len(examples) == len(texts) == len(reviews)
    fresh = {tasks.ROTTEN_TOMATOES.template.replace("{text}", r["text"].strip()) for r in records
             if r["category"] == "fresh"}
    assert all((e.label == 1) == (e.prompt in fresh) for e in examples[:500])


def test_scoring_reads_each_rows_last_real_token(tokenizer) -> None:
    """A stub LM whose next-token logits depend only on the current token: reading a padded position
    (or the wrong row) would answer with the pad token's preference."""
    encoder = tasks.PromptEncoder(tokenizer, max_length=64)
    yes, no = encoder.piece_ids(" great")[0], encoder.piece_ids(" terrible")[0]
    prompts = ["Yes", "No", "Maybe Yes", "the No"]
    last = [tokenizer(p)["input_ids"][-1] for p in prompts]
    table = torch.zeros(len(tokenizer), len(tokenizer))
    for prompt, token in zip(prompts, last):
        table[token, yes if prompt.endswith("Yes") else no] = 5.0
    table[tokenizer.pad_token_id, no] = 50.0
    examples = [Example(p, (" terrible", " great"), int(p.endswith("Yes"))) for p in prompts]

    def stub(batch):
        logits = table[batch["input_ids"]]
        if "logits_to_keep" in batch:
            logits = torch.take_along_dim(logits, batch["logits_to_keep"][..., None], dim=1)
        return type("Output", (), {"logits": logits})
    for select in (False, True):
        result = tasks.evaluate("classification", stub, encoder, examples, batch_size=4, select_logits=select)
        assert (result["accuracy"], result.predicted) == (1.0, (2, 2))


def test_paired_gain_matches_a_hand_computed_example() -> None:
    """d = after - before = [0, 1, 0, -1, 1]: mean 0.2; squared deviations 0.04 + 0.64 + 0.04 + 1.44 + 0.64
    = 2.8; sample variance 2.8 / 4 = 0.7; SE = sqrt(0.7 / 5) = sqrt(0.14)."""
    gain = tasks.paired_gain([1, 0, 1, 1, 0], [1, 1, 1, 0, 1])
    assert (gain.gain, gain.size) == (pytest.approx(0.2, abs=1e-15), 5)
    assert gain.se == pytest.approx(math.sqrt(0.14), rel=1e-15)
    low, high = gain.interval()
    assert (low, high) == (pytest.approx(0.2 - 1.96 * math.sqrt(0.14)), pytest.approx(0.2 + 1.96 * math.sqrt(0.14)))
    assert tasks.paired_gain([1.0, 0.0], [0.0, 1.0]) == tasks.PairedGain(0.0, 1.0, 2)  # d = [-1, 1]: exact in binary
    assert tasks.paired_gain([1, 1, 0], [1, 1, 0]) == tasks.PairedGain(0.0, 0.0, 3)  # the same predictions: no noise
    assert math.isnan(tasks.paired_gain([0], [1]).se)
    with pytest.raises(ValueError, match="same examples"):
        tasks.paired_gain([1, 0], [1])


def test_evaluations_keep_each_examples_score_in_example_order(tokenizer) -> None:
    """Accuracy's per-example values are 1/0 for right/wrong in the order given, whatever order the chunks ran in."""
    encoder = tasks.PromptEncoder(tokenizer, max_length=64)
    examples = [tasks.Example(prompt="It is " + " ".join(["good"] * n), candidates=(" terrible", " great"), label=n % 2)
                for n in (5, 1, 3, 2)]
    great = encoder.piece_ids(" great")[0]

    def forward(batch):  # always prefers " great": right exactly where the label is 1
        logits = torch.zeros(*batch["input_ids"].shape, len(tokenizer))
        logits[..., great] = 1.0
        return type("Output", (), {"logits": logits})()
    result = tasks.evaluate("classification", forward, encoder, examples, batch_size=3)
    assert result.per_example == (1.0, 1.0, 1.0, 0.0) and result["accuracy"] == 0.75
