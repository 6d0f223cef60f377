"""pytest configuration for the suite. The tiny models, batches and engine helpers the tests share live in
tests/tiny.py, a plain module (``from tiny import make_model``). The fixtures of the finetune tests (a tiny
model folder, its tokenizer, a labelled data file) come from tests/finetune_setup.py and are registered
here, so test modules ask for them by name without importing them."""
from finetune_setup import data_file, model_dir, tokenizer  # noqa: F401 (pytest fixtures, registered by import)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()  # every test, including those that load a model without tests/tiny.py
