"""The one place where zo2 touches what differs between supported releases of its dependencies, or
what they keep private. Each entry names the releases it was checked on; the tests that exercise it are
named beside it, and run in the suite on whatever release is installed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import trainer_utils

#: Later transformers releases (5.17 and 5.24 checked) have ``trainer_utils.rotate_checkpoints``; 5.0 has
#: only the private ``Trainer._rotate_checkpoints``. Tested on the installed release by tests/test_trainer.py
#: and tests/test_resume.py (save_total_limit keeps the newest complete checkpoints).
_ROTATE = getattr(trainer_utils, "rotate_checkpoints", None)


def rotate_checkpoints(trainer: Any, run_dir: Path, limit: int | None) -> None:
    """Delete ``trainer``'s oldest checkpoints in ``run_dir`` beyond ``limit`` (by modification time,
    keeping the best one), as Trainer does after each save."""
    if _ROTATE is not None:
        _ROTATE(output_dir=str(run_dir), save_total_limit=limit,
                best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
        return
    saved, trainer.args.save_total_limit = trainer.args.save_total_limit, limit
    try:
        trainer._rotate_checkpoints(use_mtime=True, output_dir=str(run_dir))  # transformers 5.0
    finally:
        trainer.args.save_total_limit = saved


def mark_placed(model: Any) -> None:
    """Tell accelerate (1.10 to 1.15 checked) that ``model`` is prepared, so that Trainer neither moves it
    nor wraps it in DDP: zo2's engine places the weights. Tested by every trainer test (a moved or
    wrapped model would not train through the engine) and the torchrun ones (no DDP)."""
    model._is_accelerate_prepared = True
