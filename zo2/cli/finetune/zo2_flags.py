"""ZO2's MeZO-runner flags (``run.py``'s names) as aliases of ``zo2 finetune``'s, and a clear error for those
that have no equivalent. ``examples/mezo_runner/mezo.sh`` calls ``zo2 finetune`` with them."""
from __future__ import annotations

import argparse
from typing import Any, Callable

#: run.py flag -> (zo2 finetune's destination, how the value converts); value None: a switch giving that value.
ALIASES: dict[str, tuple[str, Callable[[str], Any] | None, Any]] = {
    "--model_name": ("model", str, None),
    "--task_name": ("task", None, None),  # converted by --task's own type (lower case, known task)
    "--num_train": ("train_examples", int, None),
    "--num_eval": ("eval_examples", int, None),
    "--max_steps": ("steps", int, None),
    "--learning_rate": ("lr", float, None),
    "--zo_eps": ("eps", float, None),
    "--per_device_train_batch_size": ("batch_size", int, None),
    "--weight_decay": ("weight_decay", float, None),
    "--train_set_seed": ("seed", int, None),
    "--max_length": ("max_length", int, None),
    "--eval_steps": ("eval_every", int, None),
    "--save_steps": ("save_every", int, None),
    "--save_total_limit": ("save_total_limit", int, None),
    "--output_dir": ("output_dir", str, None),
    "--lr_scheduler_type": ("lr_scheduler", None, None),
    "--zo_method": ("method", None, None),
    "--working_device": ("working_device", str, None),
    "--lora_r": ("lora_rank", int, None),
    "--lora_alpha": ("lora_alpha", float, None),
    "--load_float16": ("dtype", None, "float16"),
    "--load_bfloat16": ("dtype", None, "bfloat16"),
    "--lora": ("peft", None, "lora"),
    "--load_best_model_at_end": ("save_best", None, True),
}

#: run.py flags zo2 finetune has no equivalent for -> what to do instead.
REFUSED = {
    "--num_dev": "zo2 finetune has one held-out set: size it with --num_eval (--eval-examples)",
    "--tag": "name the run with --output_dir (--output-dir)",
    "--logging_steps": "zo2 finetune logs every step (--log-level sets the verbosity)",
    "--eval_strategy": "evaluation runs every --eval_steps (--eval-every) steps; 0 turns it off",
    "--save_strategy": "checkpoints are saved every --save_steps (--save-every) steps and at the end",
    "--prefix_tuning": "prefix tuning is not supported: use --lora (or --peft lora|ia3)",
    "--num_prefix": "prefix tuning is not supported: use --lora (or --peft lora|ia3)",
    "--no_reparam": "prefix tuning is not supported: use --lora (or --peft lora|ia3)",
    "--prefix_init_by_real_act": "prefix tuning is not supported: use --lora (or --peft lora|ia3)",
    "--load_int8": "8-bit weights are not supported: use --load_float16 or --load_bfloat16",
    "--sfc": "surface-form calibration is not supported",
    "--icl_sfc": "surface-form calibration is not supported",
    "--num_train_sets": "zo2 finetune draws one training set (seeded by --seed)",
    "--only_train_option": "classification tasks train on the answer only; set --train_as_classification to choose "
                           "the loss",
    "--head_tuning": "train a subset with --peft, or freeze parameters in Python (ZOEngine perturbs only "
                     "requires_grad ones)",
    "--linear_probing": "linear probing is first-order: use --trainer regular (--first-order)",
    "--untie_emb": "untie the weights in the model's config.json (tie_word_embeddings: false)",
    "--non_diff": "non-differentiable objectives are an engine feature (ZOEngine(objective=...)), not a flag",
    "--offloading_device": "zo2 finetune offloads to CPU memory with --zo_mode zo2 (--offload); disk offloading "
                           "is ZOConfig(offloading_device='disk') in Python",
}


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


class _Refused(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None):
        parser.error(f"{option} (a ZO2 run.py flag) has no equivalent in zo2 finetune: {REFUSED[option]}")


class _Choice(argparse.Action):
    """A run.py flag whose value selects zo2 finetune settings (``--zo_mode``, ``--trainer``,
    ``--train_as_classification``): ``settings`` maps each value to {dest: setting}."""

    def __init__(self, *args: Any, settings: dict[Any, dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None):
        for dest, value in self.settings[values].items():
            setattr(namespace, dest, value)


#: run.py flags whose value picks settings: flag -> (value type, {value: {dest: setting}}, help).
CHOICES = {
    "--zo_mode": (str, {"zo2": {"offload": True}, "zo": {"offload": False}},
                  "zo2: offload the blocks (--offload); zo: keep them resident (--no-offload)"),
    "--trainer": (str, {"zo": {"first_order": False}, "regular": {"first_order": True}},
                  "zo: zeroth-order training; regular: the first-order baseline (--first-order)"),
    "--train_as_classification": (_bool, {True: {"objective": "classification"}, False: {"objective": "lm"}},
                                  "MeZO's loss over the candidates (--objective classification); False: the LM "
                                  "loss of the answer (--objective lm)"),
}


def add_zo2_flag_aliases(parser: argparse.ArgumentParser) -> None:
    """Add ZO2 run.py's flags to ``zo2 finetune``'s ``parser`` (after its own): each alias sets the same
    destination as the native flag (converted by its type, checked against its choices); a flag without an
    equivalent stops the parse with what to use instead."""
    native = {action.dest: action for action in parser._actions}
    group = parser.add_argument_group("ZO2 MeZO-runner flags (aliases)")
    for flag, (dest, convert, const) in ALIASES.items():
        target = native[dest]
        name = target.option_strings[0]
        if const is not None:
            group.add_argument(flag, dest=dest, action="store_const", const=const, default=argparse.SUPPRESS,
                               help=f"= {name} {const}" if not isinstance(const, bool) else f"= {name}")
            continue
        group.add_argument(flag, dest=dest, type=target.type or convert, choices=target.choices,
                           default=argparse.SUPPRESS, help=f"= {name}")
    for flag, (value_type, settings, text) in CHOICES.items():
        switch = {"nargs": "?", "const": True} if value_type is _bool else {"choices": list(settings)}
        group.add_argument(flag, type=value_type, action=_Choice, settings=settings, default=argparse.SUPPRESS,
                           help=text, **switch)
    for flag in REFUSED:
        group.add_argument(flag, nargs="*", action=_Refused, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
