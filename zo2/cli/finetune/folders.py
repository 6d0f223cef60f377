"""Output folders of a finetune run, written without storing the same weights twice.

A folder is built beside its target and renamed into place, so a reader (or an interrupted run)
never sees half of one. ``best/`` and ``final/`` that hold the weights of a checkpoint already on disk
are hard links to its files: one copy on disk, and each folder stays whole when the other is pruned.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ...persist.durable import replace_folder, staging_folder

logger = logging.getLogger(__name__)


def link_folder(source: Path, target: Path) -> None:
    """Make ``target`` a folder of hard links to ``source``'s files (copies where the filesystem cannot
    link, with a warning)."""
    staging = staging_folder(target)
    copied = 0
    try:
        for file in sorted(source.rglob("*")):
            destination = staging / file.relative_to(source)
            if file.is_dir():
                destination.mkdir(parents=True, exist_ok=True)
                continue
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(file, destination)
            except OSError:
                shutil.copy2(file, destination)
                copied += 1
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if copied:
        logger.warning("could not hard-link %d files of %s into %s: copied them", copied, source, target)


def save_model_folder(model: Any, tokenizer: Any, target: Path) -> None:
    """Save a plain Hugging Face folder (model + tokenizer) to ``target``, replacing an old one."""
    staging = staging_folder(target)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
