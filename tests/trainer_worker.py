"""A tiny ZOTrainer job shared by the trainer tests, and the subprocess entry points they launch.

    python tests/trainer_worker.py hang OUTPUT_DIR MAX_STEPS SAVE_STEPS HANG_AT   # trains, then hangs at step HANG_AT
    torchrun --nproc_per_node 2 tests/trainer_worker.py dp FLOW OUTPUT_FILE STEPS BATCH  # data parallel; rank 0 saves

FLOW is how the engine is made: ``zo_config`` (the trainer builds it) or ``zo_init`` (ZO2's flow: the model
is built under ``zo_hf_init`` and ``model.zo_init(cfg)`` builds it before the trainer exists).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments, default_data_collator

sys.path.insert(0, str(Path(__file__).parent))
from tiny import VOCAB, make_model  # noqa: E402

from zo2 import ZOConfig, ZOTrainer, zo_hf_init  # noqa: E402


def dataset(size: int = 16, length: int = 8, seed: int = 0) -> list[dict]:
    """Rows of a learnable pattern (each row counts up from its own start) with padded rows."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(size):
        start = int(torch.randint(3, VOCAB - length, (), generator=generator))
        ids = torch.arange(start, start + length)
        mask = torch.ones(length, dtype=torch.long)
        if i % 4 == 0:  # some left padding
            ids[:2], mask[:2] = 0, 0
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def training_args(output_dir: str | Path, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=5e-3, max_steps=8,
                  lr_scheduler_type="linear", warmup_steps=2, logging_steps=1, save_strategy="no",
                  report_to=[], use_cpu=True, seed=1, data_seed=1, disable_tqdm=True, dataloader_num_workers=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def build_trainer(output_dir: str | Path, *, arch: str = "llama", data_size: int = 16, callbacks=(),
                  zo_config: dict | None = None, zo_init: bool = False, dtype: torch.dtype = torch.float32,
                  **overrides) -> ZOTrainer:
    """A ZOTrainer on a tiny model; everything is a pure function of the arguments. ``zo_init``: ZO2's
    flow (``with zo_hf_init(cfg): model = ...; model.zo_init(cfg)``, then the trainer without zo_config)."""
    # lr as TrainingArguments': a zo_init model trains at its ZOConfig.lr (ZO2's rule), the trainer's engine at args'
    config = ZOConfig(**{"working_device": "cpu", "eps": 1e-3, "seed": 5, "lr": 5e-3, **(zo_config or {})})
    if zo_init:
        with zo_hf_init(config):
            model = make_model(arch, dtype=dtype)
            model.zo_init(config)
        config = None
    else:
        model = make_model(arch, dtype=dtype)
    return ZOTrainer(model, args=training_args(output_dir, **overrides), zo_config=config,
                     train_dataset=dataset(data_size), eval_dataset=dataset(8, seed=1),
                     data_collator=default_data_collator, callbacks=list(callbacks))


def weights(trainer: ZOTrainer) -> torch.Tensor:
    """All master weights of the trainer's engine, flushed, as one flat tensor."""
    engine = trainer.zo_engine
    engine.flush()
    return torch.cat([unit.master.detach().cpu().reshape(-1) for unit in engine.units])


def train_losses(trainer: ZOTrainer) -> dict[int, tuple]:
    """step -> (loss, projected_grad, learning_rate) from the trainer's log history."""
    return {log["step"]: (log["loss"], log["projected_grad"], log["learning_rate"])
            for log in trainer.state.log_history if "loss" in log}


def run_summary(trainer: ZOTrainer) -> dict:
    """What two runs that should agree are compared on: logged losses, seeds, final weights."""
    return {"losses": train_losses(trainer), "seeds": [u.seed for u in trainer.zo_engine.history],
            "weights": weights(trainer)}


class _HangAt(TrainerCallback):
    """Signals (a file) and sleeps forever at the end of step ``step``: the test kills the process."""

    def __init__(self, step: int, marker: Path) -> None:
        self.step, self.marker = step, marker

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.marker.write_text("ready")
            while True:
                time.sleep(1)


def _hang(output_dir: str, max_steps: str, save_steps: str, hang_at: str) -> None:
    out = Path(output_dir)
    trainer = build_trainer(out, max_steps=int(max_steps), save_strategy="steps", save_steps=int(save_steps),
                            callbacks=[_HangAt(int(hang_at), out / "hanging")])
    trainer.train()


def _data_parallel(flow: str, output_file: str, steps: str, batch: str) -> None:
    import torch.distributed as dist

    trainer = build_trainer(Path(output_file).parent / "dp", data_size=2 * int(batch), max_steps=int(steps),
                            zo_init={"zo_config": False, "zo_init": True}[flow], dtype=torch.float64,
                            per_device_train_batch_size=int(batch), lr_scheduler_type="constant", warmup_steps=0)
    trainer.train()
    if dist.get_rank() == 0:
        torch.save(run_summary(trainer), output_file)
    # Leave together and tear the group down before the interpreter exits: a rank that exits while
    # gloo's threads still serve the other one can abort ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    {"hang": _hang, "dp": _data_parallel}[sys.argv[1]](*sys.argv[2:])
