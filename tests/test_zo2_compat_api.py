"""ZO2's documented Python API on zo2: README usage 3 (the custom loop), the OPT getters, ``model.opt``, the
loss-function hooks and custom loss functions (ZO2's signatures and order), ZO2's ZOConfig fields and
``MeZOSGDConfig``'s defaults, ``seed_everything``. Tiny models built from configs, CPU."""
from __future__ import annotations

import random

import pytest
import torch
import transformers
from tiny import make_batch, make_config, masters
from transformers import OPTForCausalLM

from zo2 import (
    ZOConfig,
    ZOConfigError,
    get_opt_for_causalLM,
    get_opt_for_question_answering,
    get_opt_for_sequence_classification,
    zo_hf_init,
)
from zo2.config.mezo_sgd import MeZOSGDConfig
from zo2.config.zo2_fields import ZO2FieldError
from zo2.objectives.task_loss import causal_lm_loss
from zo2.utils.utils import seed_everything


def _opt_model(cfg: ZOConfig, seed: int = 0) -> OPTForCausalLM:
    """README usage: build the model under ``zo_hf_init`` and ``zo_init`` it."""
    torch.manual_seed(seed)
    with zo_hf_init(cfg):
        model = OPTForCausalLM(make_config("opt"))
        model.zo_init(cfg)
    return model


def _cfg(**overrides) -> ZOConfig:
    return ZOConfig(**{"method": "mezo-sgd", "zo2": True, "offloading_device": "cpu", "working_device": "cpu",
                       "lr": 1e-3, **overrides})


# ------------------------------------------------------------------------------ the custom loop, model.opt
def test_readme_custom_loop_trains_at_the_config_lr_and_model_opt_reads_the_last_step():
    model = _opt_model(_cfg(lr=1e-5))
    batch = make_batch(padded=False)
    for _ in range(2):
        model.zo_train()
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"])
        model.zo_eval()
        output = model(input_ids=batch["input_ids"], labels=batch["labels"])
    update = model.zo_engine.log.step_updates(1)[0]
    assert update.lr == 1e-5 and model.opt.lr == 1e-5  # ZOConfig.lr is the lr of the updates
    assert (model.opt.projected_grad, model.opt.zo_random_seed) == (update.projected_grad, update.seed)
    assert loss.item() == pytest.approx(model.zo_last_step.loss, rel=1e-7)  # the +eps loss
    assert output.loss.item() == pytest.approx(causal_lm_loss(output.logits, batch["labels"]).item(), rel=1e-6)
    group = model.opt.param_groups[0]
    assert (group["lr"], group["eps"], len(group["params"])) == (1e-5, 1e-3, len(list(model.parameters())))
    with pytest.raises(AttributeError, match="already recorded"):
        model.opt.projected_grad = 0  # ZO2's way to drop a step after the fact
    model.opt.lr = 2e-5
    model.zo_train()
    model(input_ids=batch["input_ids"], labels=batch["labels"])
    assert model.zo_engine.log.step_updates(2)[0].lr == 2e-5  # model.opt.lr = ... sets ZOConfig.lr


def test_positional_input_ids_train_as_keywords():
    batch = make_batch(padded=False)
    trained = []
    for call in (lambda m: m(batch["input_ids"], labels=batch["labels"]),
                 lambda m: m(input_ids=batch["input_ids"], labels=batch["labels"])):
        model = _opt_model(_cfg())
        model.zo_train()
        losses = [call(model).item() for _ in range(2)]
        trained.append((losses, masters(model.zo_engine)))
    assert trained[0][0] == trained[1][0] and torch.equal(trained[0][1], trained[1][1])
    assert not torch.equal(trained[0][1], masters(_opt_model(_cfg()).zo_engine))  # the steps moved the weights


@pytest.mark.parametrize("getter, head", [(get_opt_for_causalLM, "causal"),
                                          (get_opt_for_sequence_classification, "seq-cls"),
                                          (get_opt_for_question_answering, "qa")])
def test_opt_getters_build_models_that_train_right_after_zo_init(getter, head):
    """ZO2's test flow: ``getter(cfg)(config)``, ``.to(device)``, ``zo_init(cfg)``, then each call is a step."""
    cfg = MeZOSGDConfig(lr=1e-3, weight_decay=0.1, eps=1e-3, working_device="cpu")
    cfg.zo2 = True
    cfg.overlap = True
    model = getter(cfg)(make_config("opt", num_labels=2)).to("cpu")
    assert isinstance(model, getattr(transformers, type(model).__name__))
    model.zo_init(cfg)
    losses = [model(**make_batch(head)).item() for _ in range(2)]
    assert model.zo_engine.step_count == 2 and model.opt.projected_grad == model.zo_last_step.projected_grad
    assert losses[-1] == pytest.approx(model.zo_last_step.loss, rel=1e-7)


# ------------------------------------------------------------------------------------ hooks and custom losses
def test_train_hooks_and_custom_loss_run_per_pass_in_zo2s_order_and_define_the_step():
    model = _opt_model(_cfg(eps=1e-2))
    calls, customs = [], []

    def pre(self, input_ids, logits, labels):
        calls.append("pre")
        return input_ids, logits, labels

    def custom(self, input_ids, logits, labels, **kwargs):
        calls.append(("custom", sorted(kwargs)))
        customs.append(logits.double().logsumexp(-1).mean().item() * float(kwargs["option_len"].sum()))
        return logits.double().logsumexp(-1).mean() * kwargs["option_len"].sum()

    def post(self, loss, input_ids, logits, labels):
        calls.append("post")
        return 2 * loss, input_ids, logits, labels

    model.register_zo_train_loss_fn_pre_hook(pre)
    model.register_zo_train_loss_fn_post_hook(post)
    model.zo_custom_train_loss_fn = custom
    batch = make_batch(padded=False)
    model.zo_train()
    loss = model(batch["input_ids"], labels=batch["labels"], option_len=torch.tensor([1, 2, 0, 1]))
    assert calls == ["pre", ("custom", ["option_len"]), "post"] * 2  # +eps pass, then -eps pass
    step = model.zo_last_step
    assert (step.loss, step.loss_minus) == pytest.approx((2 * customs[0], 2 * customs[1]), rel=1e-12)
    assert loss.item() == pytest.approx(2 * customs[0], rel=1e-6)
    assert step.projected_grad == pytest.approx((step.loss - step.loss_minus) / (2 * 1e-2), rel=1e-9)


def test_eval_custom_loss_and_hooks_shape_the_eval_output():
    model = _opt_model(_cfg())
    batch = make_batch(padded=False)
    model.zo_eval()
    plain = model(input_ids=batch["input_ids"], labels=batch["labels"])
    order = []
    model.register_zo_eval_loss_fn_pre_hook(lambda self, i, logits, labels: (order.append("pre"), (i, logits, labels))[1])
    model.zo_custom_eval_loss_fn = lambda self, i, logits, labels, **kw: (order.append("custom"), logits.mean())[1]

    def post(self, output, input_ids, logits, labels):
        order.append("post")
        output["loss"] = output["loss"] + 1
        return output, input_ids, logits, labels

    model.register_zo_eval_loss_fn_post_hook(post)
    hooked = model(input_ids=batch["input_ids"], labels=batch["labels"])
    assert order == ["pre", "custom", "post"]
    assert torch.equal(hooked.logits, plain.logits) and hooked.loss.item() == (plain.logits.mean() + 1).item()


def test_register_custom_opt_names_what_to_use_instead():
    model = _opt_model(_cfg())
    with pytest.raises(NotImplementedError, match="ZOConfig\\(method=...\\)"):
        model.register_custom_opt(object())


# --------------------------------------------------------------------------------------- ZOConfig's ZO2 fields
@pytest.mark.parametrize("field, value, zo2_field, expected", [
    ("zo_method", "meazo", "method", "meazo"),
    ("overlap", False, "num_slots", 1),
    ("overlap", True, "num_slots", 2),
    ("amp", True, "storage_dtype", "float16"),
    ("communicate_optimize_method", "bucket", "num_slots", 2),
    ("compute_module_optimize_method", "", "num_slots", 2),
    ("compute_function_optimize_method", "", "num_slots", 2),
    ("amp_compress_method", "naive", "storage_dtype", None),
    ("debug_mode", False, "num_slots", 2),
])
def test_zo2_fields_map_to_zo2s_settings_at_construction_and_when_set(field, value, zo2_field, expected):
    built = ZOConfig(working_device="cpu", **{field: value})
    assert getattr(built, zo2_field) == expected
    later = ZOConfig(working_device="cpu")
    setattr(later, field, value)
    assert getattr(later, zo2_field) == expected and later == built
    if field in ("zo_method", "overlap", "amp"):
        assert getattr(built, field) == value  # read back in ZO2's terms


def test_amp_precisions_map_to_the_storage_dtype():
    cfg = ZOConfig(working_device="cpu", amp=True, precision_on_offloading_device=torch.bfloat16,
                   precision_on_working_device=torch.bfloat16, amp_precision=torch.bfloat16)
    assert cfg.storage_dtype == "bfloat16" and cfg.precision_on_offloading_device is torch.bfloat16
    assert ZOConfig(working_device="cpu", precision_on_offloading_device=torch.bfloat16).storage_dtype is None  # no amp


@pytest.mark.parametrize("field, value, fix", [
    ("overlap", "yes", "True or False"),
    ("amp_compress_method", "int8", "'naive'"),
    ("compute_module_optimize_method", "torch.compile", "torch.compile"),
    ("compute_function_optimize_method", "torch.jit.script", "torch.jit"),
    ("communicate_optimize_method", "nccl", "'bucket'"),
    ("debug_mode", True, "lr=0"),
    ("zo_method", "zo-adam", "method"),
])
def test_zo2_values_zo2_cannot_honour_are_refused_with_what_to_use(field, value, fix):
    with pytest.raises(ValueError, match=fix):
        ZOConfig(working_device="cpu", **{field: value})
    cfg = ZOConfig(working_device="cpu")
    with pytest.raises(ValueError, match=fix):
        setattr(cfg, field, value)
    assert cfg == ZOConfig(working_device="cpu")  # the refused value left nothing behind


def test_amp_with_another_working_precision_is_refused():
    with pytest.raises(ZO2FieldError, match="storage_dtype='float32'"):
        ZOConfig(working_device="cpu", amp=True, precision_on_working_device=torch.float32)


def test_fields_set_after_construction_are_validated_and_a_refused_value_is_not_kept():
    cfg = ZOConfig(working_device="cpu", lr=1e-4)
    with pytest.raises(ZOConfigError, match="lr"):
        cfg.lr = -1.0
    assert cfg.lr == 1e-4
    cfg.storage_dtype = "bf16"
    assert cfg.storage_dtype == "bfloat16"  # normalised as at construction


def test_mezo_sgd_config_has_zo2s_defaults():
    cfg = MeZOSGDConfig(working_device="cpu")
    assert (cfg.lr, cfg.weight_decay, cfg.method) == (1e-3, 0.1, "mezo-sgd")
    assert isinstance(cfg, ZOConfig) and MeZOSGDConfig(working_device="cpu", overlap=False).num_slots == 1


def test_seed_everything_reseeds_python_numpy_and_torch():
    np = pytest.importorskip("numpy")
    draws = []
    for _ in range(2):
        seed_everything(7)
        draws.append((random.random(), float(np.random.rand()), torch.rand(()).item()))
    assert draws[0] == draws[1]
