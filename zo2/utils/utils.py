"""ZO2's ``zo2.utils.utils``: ``seed_everything``."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) generators, and ``PYTHONHASHSEED``
    for subprocesses. zo2's own noise does not need it: z is a pure function of ``ZOConfig.seed``."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
