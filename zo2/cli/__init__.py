"""The ``zo2`` command: ``zo2 finetune`` (:mod:`.finetune`), ``zo2 plan`` (:mod:`.plan`) and ``zo2 replay``
(:mod:`.replay`); :mod:`.main` parses the arguments and reports errors."""
from .main import build_parser, main, parse_args

__all__ = ["build_parser", "main", "parse_args"]
