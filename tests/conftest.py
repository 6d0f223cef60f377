"""pytest configuration for the suite. The tiny models, batches and engine helpers the tests share live in
tests/tiny.py, a plain module (``from tiny import make_model``)."""
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()  # every test, including those that load a model without tests/tiny.py
