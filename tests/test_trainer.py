"""ZOTrainer (transformers.Trainer) and ZOSFTTrainer (TRL) train with ZO steps: the loss falls, lr
schedules drive the updates, gradient accumulation equals one big batch, data parallel under torchrun
equals one process, saving writes safetensors plus the engine state, and bad options are refused."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import first_order_drop, make_model
from trainer_worker import build_trainer, dataset, run_summary, training_args, weights

from zo2 import ZOConfig, ZOTrainer, attach_zo_methods
from zo2.checkpoint import MANIFEST_NAME, SEED_LOG_NAME, load_checkpoint, replay_seed_log

WORKER = Path(__file__).with_name("trainer_worker.py")


PEAK_LR = 5e-4


def test_trainer_trains_evaluates_and_logs(tmp_path):
    # one batch of 4 rows every step, evaluated on those rows: the loss must fall by at least half of what
    # the steps' projected gradients predict to first order (the margin: tests/test_training.py)
    trainer = build_trainer(tmp_path, data_size=4, max_steps=24, learning_rate=PEAK_LR, warmup_steps=3)
    trainer.eval_dataset = dataset(4)
    before = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    after = trainer.evaluate()["eval_loss"]
    predicted = first_order_drop(trainer.zo_engine.history)
    assert predicted > 0 and before - after > 0.5 * predicted, (before, after, predicted)
    assert result.global_step == 24 and trainer.zo_engine.step_count == 24
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 24 and {"projected_grad", "loss_minus", "tokens_per_second", "learning_rate"} <= set(logs[0])
    assert "grad_norm" not in logs[0]
    # Trainer's scheduler drives every update's lr: linear warmup over 3 steps, then linear decay to 0.
    lrs = [update.lr for update in trainer.zo_engine.history]
    assert lrs == [log["learning_rate"] for log in logs]
    assert lrs[:4] == pytest.approx([0.0, PEAK_LR / 3, 2 * PEAK_LR / 3, PEAK_LR])
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:]))
    assert result.training_loss == pytest.approx(sum(log["loss"] for log in logs) / 24)


# Float64 models: the runs compared below differ only in how rows are grouped (2 + 2 or 4 at once), so
# they agree to float64 rounding (~1e-15 of a loss; g = dL / (2 eps) scales it by 500). In float32 that
# rounding, which differs between CPU kernels (AVX2, AVX-512, AMX) and thread counts, left a margin of
# only ~5x under any tolerance that still tells a wrong update apart. Here it is over 1e4x: 1e-9 of a
# loss, 1e-7 of g, 1e-10 of a weight (the updates themselves are ~1e-2).
EXACT = dict(loss=1e-9, grad=1e-7, weights=1e-10)


def _assert_same_run(run: dict, reference: dict, tmp_path) -> None:
    """``run`` and ``reference`` (``run_summary``) logged the same steps and ended at the same weights."""
    assert run["seeds"] == reference["seeds"] and run["losses"].keys() == reference["losses"].keys()
    for step, (loss, grad, lr) in reference["losses"].items():
        assert run["losses"][step][0] == pytest.approx(loss, rel=EXACT["loss"])
        assert run["losses"][step][1] == pytest.approx(grad, abs=EXACT["grad"])
        assert run["losses"][step][2] == lr
    start = weights(build_trainer(tmp_path / "untrained", dtype=torch.float64))
    assert (reference["weights"] - start).abs().max() > 1e3 * EXACT["weights"]  # so the equality is not vacuous
    torch.testing.assert_close(run["weights"], reference["weights"], rtol=0, atol=EXACT["weights"])


def test_gradient_accumulation_equals_one_batch_of_k_times_the_size(tmp_path):
    accumulated = build_trainer(tmp_path / "a", max_steps=3, per_device_train_batch_size=2,
                                gradient_accumulation_steps=2, dtype=torch.float64)
    accumulated.train()
    whole = build_trainer(tmp_path / "b", max_steps=3, per_device_train_batch_size=4, dtype=torch.float64)
    whole.train()
    _assert_same_run(run_summary(accumulated), run_summary(whole), tmp_path)


@pytest.fixture(scope="module")
def one_process_with_batch_4(tmp_path_factory):
    single = build_trainer(tmp_path_factory.mktemp("single"), data_size=4, max_steps=3, per_device_train_batch_size=4,
                           lr_scheduler_type="constant", warmup_steps=0, dtype=torch.float64)
    single.train()
    return run_summary(single)


@pytest.mark.parametrize("flow", ["zo_config", "zo_init"])
def test_two_processes_with_batch_b_end_where_one_process_with_batch_2b_ends(tmp_path, flow, one_process_with_batch_4):
    """Both ways of making the engine train data parallel under torchrun: the trainer builds it from
    zo_config, or ZO2's flow builds it with model.zo_init(cfg) before the trainer (and before accelerate
    made a process group: zo_init joins torchrun's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(WORKER), "dp", flow,
                    str(tmp_path / "dp.pt"), "3", "2"], check=True, env=env, cwd=tmp_path, timeout=300)
    _assert_same_run(torch.load(tmp_path / "dp.pt"), one_process_with_batch_4, tmp_path)


def test_checkpoints_hold_safetensors_engine_state_and_a_replayable_seed_log(tmp_path):
    trainer = build_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=1)
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]  # rotated after completion
    checkpoint = load_checkpoint(tmp_path / "checkpoint-4")  # the manifest verifies every file
    assert checkpoint.step == 4 and checkpoint.extra == {"global_step": 4}
    files = {p.name for p in checkpoint.path.iterdir()}
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json",
            MANIFEST_NAME, SEED_LOG_NAME} <= files
    rebuilt = replay_seed_log(make_model("llama"), checkpoint.path / SEED_LOG_NAME)
    trained = dict(trainer.model.named_parameters())
    for name, param in rebuilt.named_parameters():
        assert torch.equal(param, trained[name]), name
    base = dict(make_model("llama").named_parameters())
    assert any(not torch.equal(trained[name], base[name]) for name in base)  # replaying nothing would not do


def test_zo2_compatible_model_with_zo_init_trains(tmp_path):
    model = make_model("gpt2")
    attach_zo_methods(model).zo_init(ZOConfig(working_device="cpu", eps=1e-3, seed=2))
    start = torch.cat([unit.master.detach().clone().reshape(-1) for unit in model.zo_engine.units])
    trainer = ZOTrainer(model, args=training_args(tmp_path, max_steps=2), train_dataset=dataset(8))
    trainer.train()
    assert trainer.zo_engine is model.zo_engine and model.zo_engine.step_count == 2
    assert not torch.equal(weights(trainer), start)  # the steps updated the engine's weights


@pytest.mark.parametrize("overrides, message", [
    (dict(optim="adafactor"), "optim='adafactor'.*first-order"),
    (dict(optim="sgd"), "optim='sgd'"),
    (dict(torch_compile=True), "torch_compile"),
    (dict(weight_decay=0.1), "ZOConfig.weight_decay"),
    (dict(label_smoothing_factor=0.1), "label_smoothing_factor"),
    (dict(neftune_noise_alpha=5.0), "neftune_noise_alpha"),
])
def test_options_that_cannot_apply_raise_clear_errors(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_trainer(tmp_path, **overrides)


def test_optimizers_and_missing_config_are_refused(tmp_path):
    model, config = make_model("llama"), ZOConfig(working_device="cpu")
    with pytest.raises(ValueError, match="does not take optimizer"):
        ZOTrainer(model, args=training_args(tmp_path), train_dataset=dataset(4), zo_config=config,
                  optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(ValueError, match="needs zo_config"):
        ZOTrainer(make_model("llama"), args=training_args(tmp_path), train_dataset=dataset(4))
    with pytest.raises(ValueError, match="lr='auto'.*give it a number"):  # the trainer's lr is TrainingArguments'
        ZOTrainer(make_model("llama"), args=training_args(tmp_path), train_dataset=dataset(4),
                  zo_config=ZOConfig(working_device="cpu", lr="auto"))


def test_options_without_effect_are_turned_off(tmp_path):
    trainer = build_trainer(tmp_path, max_grad_norm=0.5, gradient_checkpointing=True)
    assert trainer.args.max_grad_norm == 0 and not trainer.args.gradient_checkpointing


def test_sft_trainer_trains_on_a_tiny_text_dataset(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig

    from zo2 import ZOSFTTrainer

    words = ["<pad>", "<s>", "</s>", *"the cat sat on a mat dog ran far away and".split()]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    texts = ["the cat sat on a mat", "the dog ran far away", "a cat and a dog sat", "the mat ran away"] * 2
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", max_length=16,
                     disable_tqdm=True)
    trainer = ZOSFTTrainer(make_model("llama"), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                           processing_class=tokenizer, zo_config=ZOConfig(working_device="cpu", seed=4))
    start = torch.cat([unit.master.detach().clone().reshape(-1) for unit in trainer.zo_engine.units])
    result = trainer.train()
    assert result.global_step == 3 and trainer.zo_engine.step_count == 3
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(loss)) for loss in losses)
    assert not torch.equal(weights(trainer), start)  # the steps updated the weights
    assert "eval_loss" in trainer.evaluate(Dataset.from_dict({"text": texts[:4]}))
    padding_free = SFTConfig(output_dir=str(tmp_path), padding_free=True, max_length=None, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="padding_free=False"):
        ZOSFTTrainer(make_model("llama"), args=padding_free, train_dataset=Dataset.from_dict({"text": texts}),
                     processing_class=tokenizer, zo_config=ZOConfig(working_device="cpu"))
