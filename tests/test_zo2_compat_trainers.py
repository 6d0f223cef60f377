"""ZO2's trainers as its tutorial writes them, on zo2: a zo_init model trains at its ZOConfig.lr (TrainingArguments
left at their defaults, or set to another lr with a warning naming both), the step hooks run in ZO2's order, the
model's loss hooks define the step, ``tokenizer=`` and ZOSFTTrainer's ``dataset_text_field=`` /
``max_seq_length=`` are mapped to transformers' and TRL's current names."""
from __future__ import annotations

import logging

import pytest
import torch
from tiny import make_model
from trainer_worker import dataset
from transformers import TrainingArguments, default_data_collator

from zo2 import ZOConfig, zo_hf_init
from zo2.trainer.hf_transformers.trainer import ZOTrainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _zo_init_model(lr: float, arch: str = "llama"):
    """ZO2's tutorial: ZOConfig with lr, model built under zo_hf_init, model.zo_init(zo_config)."""
    zo_config = ZOConfig(method="mezo-sgd", zo2=False, working_device="cpu", lr=lr, seed=1)
    with zo_hf_init(zo_config):
        model = make_model(arch)
        model.zo_init(zo_config)
    return model


def _args(tmp_path, **overrides) -> TrainingArguments:
    return TrainingArguments(str(tmp_path), **{"max_steps": 2, "per_device_train_batch_size": 4, "report_to": [],
                                               "use_cpu": True, "save_strategy": "no", "disable_tqdm": True,
                                               "lr_scheduler_type": "constant", **overrides})


def _applied_lrs(model) -> list[float]:
    return [update.lr for update in model.zo_engine.history]


def test_tutorial_trainer_trains_at_the_zo_config_lr(tmp_path, caplog):
    """TrainingArguments left at their defaults (lr 5e-5): the model's ZOConfig.lr=1e-7 is the lr, silently."""
    model = _zo_init_model(lr=1e-7)
    with caplog.at_level(logging.WARNING):
        trainer = ZOTrainer(model, args=_args(tmp_path), train_dataset=dataset(8), data_collator=default_data_collator)
        trainer.train()
    assert _applied_lrs(model) == [1e-7, 1e-7]
    assert not [r for r in caplog.records if "learning_rate" in r.getMessage()]


def test_a_disagreeing_training_arguments_lr_is_named_and_the_zo_config_lr_used(tmp_path, caplog):
    model = _zo_init_model(lr=1e-7)
    with caplog.at_level(logging.WARNING):
        trainer = ZOTrainer(model, args=_args(tmp_path, learning_rate=1e-3), train_dataset=dataset(8),
                            data_collator=default_data_collator)
    trainer.train()
    assert _applied_lrs(model) == [1e-7, 1e-7]
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "TrainingArguments.learning_rate=0.001" in message and "ZOConfig.lr=1e-07" in message


def test_step_hooks_run_around_each_step_and_the_post_hook_loss_is_logged(tmp_path):
    model = _zo_init_model(lr=1e-3)
    trainer = ZOTrainer(model, args=_args(tmp_path, logging_steps=1), train_dataset=dataset(8),
                        data_collator=default_data_collator)
    seen = []

    def pre(model, inputs):
        seen.append(("pre", model.zo_engine.step_count))
        return model, inputs

    def post(model, inputs, loss):
        seen.append(("post", model.zo_engine.step_count, model.opt.projected_grad))
        return model, inputs, loss + 100.0

    trainer.register_zo2_training_step_pre_hook(pre)
    trainer.register_zo2_training_step_post_hook(post)
    trainer.train()
    grads = [u.projected_grad for u in model.zo_engine.history]
    assert seen == [("pre", 0), ("post", 1, grads[0]), ("pre", 1), ("post", 2, grads[1])]
    logged = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert all(loss > 100.0 for loss in logged)  # the post hook's loss is the step's logged loss


def test_the_models_custom_train_loss_is_what_the_trainer_minimises(tmp_path):
    model = _zo_init_model(lr=1e-3)
    values = []

    def custom(self, input_ids, logits, labels, **kwargs):
        values.append(logits.double().pow(2).mean().item())
        return logits.double().pow(2).mean()

    model.zo_custom_train_loss_fn = custom
    trainer = ZOTrainer(model, args=_args(tmp_path, max_steps=1), train_dataset=dataset(4),
                        data_collator=default_data_collator)
    trainer.train()
    update = model.zo_engine.history[0]
    assert len(values) == 2  # one call per perturbed pass
    assert update.projected_grad == pytest.approx((values[0] - values[1]) / (2 * 1e-3), rel=1e-9)


def test_tokenizer_is_mapped_to_processing_class_with_a_deprecation_warning(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "a": 1},
                                                                                    unk_token="<pad>")),
                                        pad_token="<pad>")
    model = _zo_init_model(lr=1e-3)
    with pytest.warns(FutureWarning, match="processing_class"):
        trainer = ZOTrainer(model, args=_args(tmp_path), train_dataset=dataset(4), tokenizer=tokenizer)
    assert trainer.processing_class is tokenizer
    with pytest.raises(ValueError, match="not both"):
        ZOTrainer(_zo_init_model(lr=1e-3), args=_args(tmp_path), tokenizer=tokenizer, processing_class=tokenizer)


def test_sft_trainer_takes_zo2s_dataset_text_field_and_max_seq_length(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from zo2.trainer.hf_trl.sft_trainer import ZOSFTTrainer

    words = ["<pad>", "<s>", "</s>", *"the cat sat on a mat dog ran far away and".split()]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    texts = ["the cat sat on a mat and the dog ran far away", "the dog ran far away", "a cat and a dog sat"] * 2
    model = _zo_init_model(lr=1e-2)
    args = _args(tmp_path, max_steps=2, per_device_train_batch_size=3)
    with pytest.warns(FutureWarning, match="processing_class"):
        trainer = ZOSFTTrainer(model, args=args, train_dataset=Dataset.from_dict({"sentence": texts}),
                               tokenizer=tokenizer, dataset_text_field="sentence", max_seq_length=6)
    assert (trainer.args.dataset_text_field, trainer.args.max_length) == ("sentence", 6)
    assert max(len(row["input_ids"]) for row in trainer.train_dataset) == 6  # cut to max_seq_length
    trainer.train()
    assert _applied_lrs(model) == [1e-2, 1e-2] and torch.isfinite(torch.tensor(trainer.state.log_history[-1]
                                                                                 ["train_loss"]))
