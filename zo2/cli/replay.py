"""``zo2 replay``: rebuild a fine-tuned model from its base and its seed log (:mod:`zo2.checkpoint`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import SEED_LOG_NAME, read_seed_log, replay_seed_log
from ..persist.manifest import CheckpointError
from ..persist.shards import ShardError, check_files

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- zo2 replay
def add_replay_command(commands: Any) -> None:
    """Add ``zo2 replay`` to the CLI's subcommands (an ``argparse`` subparsers object)."""
    parser = commands.add_parser("replay", help="rebuild a fine-tuned model from its base and a seed log",
                                 description="Apply a seed log's updates to the base model the run started from "
                                 "and save the fine-tuned model (save_pretrained).")
    parser.add_argument("--base", required=True, metavar="DIR", help="local Hugging Face folder of the base model")
    parser.add_argument("--seed-log", required=True, metavar="FILE", help=f"the run's seed log ({SEED_LOG_NAME} "
                        "in a checkpoint, or a file written by save_seed_log)")
    parser.add_argument("--output", required=True, metavar="DIR", help="where to save the rebuilt model")
    parser.add_argument("--working-device", help="device to replay on (default: the training run's, if present)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging level (default: %(default)s)")
    parser.set_defaults(handler=run_replay)


def run_replay(args: Any) -> int:
    """``zo2 replay``: load the base model as the log's class and dtype, replay, save; returns 0."""
    import transformers

    log = read_seed_log(args.seed_log)
    base = Path(args.base)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"--base {base}: not a local Hugging Face model folder (no config.json)")
    _check_output(Path(args.output), base, Path(args.seed_log))
    try:
        check_files(base)
    except ShardError as err:
        raise CheckpointError(f"--base {err}") from None
    model_class = getattr(transformers, log.get("model_class", ""), transformers.AutoModelForCausalLM)
    dtype = getattr(torch, log.get("dtype", "float32"))
    model = model_class.from_pretrained(base, dtype=dtype, local_files_only=True)
    rebuilt = replay_seed_log(model, args.seed_log, working_device=args.working_device)
    rebuilt.save_pretrained(args.output)
    try:
        transformers.AutoTokenizer.from_pretrained(base, local_files_only=True).save_pretrained(args.output)
    except (OSError, ValueError, TypeError):
        logger.info("no tokenizer in %s; saved the model only", base)
    logger.info("applied %d updates to %s; saved the model to %s", len(log["updates"]), base, args.output)
    return 0


def _check_output(output: Path, base: Path, seed_log: Path) -> None:
    """Refuse an ``--output`` that is, holds or lies inside ``--base``, or is the seed log or its folder:
    saving there would overwrite or mix with the inputs (the base could not be replayed onto again)."""
    out, base_path, log_path = output.resolve(), base.resolve(), seed_log.resolve()
    if out == base_path or base_path in out.parents or out in base_path.parents:
        raise CheckpointError(f"--output {output} is, holds or lies inside --base {base}: replaying would write over "
                              "the base model; choose an --output folder outside it")
    if out in (log_path, log_path.parent):
        raise CheckpointError(f"--output {output} is the seed log's folder ({seed_log}): saving there would write "
                              "over the checkpoint; choose another --output folder")
