"""Frozen parameters are never perturbed, updated or written back; PEFT adapters train through the engine."""
import pytest
import torch
from tiny import make_batch, make_model, masters

from zo2 import ZOConfig, ZOEngine, replay

peft = pytest.importorskip("peft")

CONFIG = dict(working_device="cpu", lr=1e-2, eps=1e-3, weight_decay=0.05)


def _freeze_attention(model):
    for name, param in model.named_parameters():
        if "self_attn" in name or "embed" in name:
            param.requires_grad_(False)
    return model


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _train(model, steps=3, **config):
    engine = ZOEngine(model, ZOConfig(**{**CONFIG, **config}))
    for t in range(steps):
        engine.step(make_batch(seed=t))
    engine.flush()
    return engine


@pytest.mark.parametrize("config", [dict(perturbation_scope="unit"), dict(perturbation_scope="module"),
                                    dict(offload_trainable=True, write_back_every=2)])
def test_frozen_parameters_stay_bit_identical_and_offloaded_equals_resident(config):
    model = _freeze_attention(make_model("llama", num_hidden_layers=3))
    before = _snapshot(model)
    offloaded = _train(model, zo2=True, **config)
    resident = _train(_freeze_attention(make_model("llama", num_hidden_layers=3)), zo2=False)
    assert any(u.offloaded for u in offloaded.units)
    assert torch.equal(masters(offloaded), masters(resident))
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param.detach(), before[name]), name
        else:
            assert torch.equal(param.detach(), before[name]), name
    assert any(not u.trainable for u in offloaded.units) and "frozen" in offloaded.describe()


def test_frozen_blocks_are_uploaded_and_never_written_back():
    model = make_model("llama", num_hidden_layers=3)
    for param in model.model.layers.parameters():
        param.requires_grad_(False)  # the blocks are frozen; embedding, norm and head train
    engine = _train(model, zo2=True)
    up, down = engine.bytes_moved()
    assert up > 0 and down == 0
    assert all(not u.trainable for u in engine.units if u.offloaded)


def test_a_mixed_block_keeps_its_frozen_part_upload_only():
    """Trainable norms inside frozen blocks: resident by default (one-way transfers); streamed with
    offload_trainable=True, when only they are written back."""
    def mixed():
        model = make_model("llama", num_hidden_layers=3)
        for name, param in model.model.layers.named_parameters():
            param.requires_grad_("norm" in name)
        return model
    resident_trainable = _train(mixed(), zo2=True)
    assert resident_trainable.bytes_moved()[1] == 0
    streamed = _train(mixed(), zo2=True, offload_trainable=True)
    trainable_bytes = sum(u.master.nbytes for u in streamed.units if u.offloaded and u.trainable)
    frozen_bytes = sum(u.master.nbytes for u in streamed.units if u.offloaded and not u.trainable)
    assert 0 < trainable_bytes < frozen_bytes
    up, down = streamed.bytes_moved()
    assert down == 3 * trainable_bytes and up >= 3 * (trainable_bytes + frozen_bytes)
    assert torch.equal(masters(streamed), masters(resident_trainable))


# ------------------------------------------------------------------------------------------ PEFT
def _lora(arch: str, seed: int = 0):
    targets = ["q_proj", "v_proj"]
    torch.manual_seed(seed)
    return peft.get_peft_model(make_model(arch, num_hidden_layers=3),
                               peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.1))


def _ia3(arch: str = "llama"):
    return peft.get_peft_model(make_model(arch, num_hidden_layers=3),
                               peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                              feedforward_modules=["down_proj"]))


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("scope", ["unit", "module"])
def test_lora_trains_only_the_adapter_and_offloaded_equals_resident(arch, scope):
    model = _lora(arch)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = _adapter(model)
    offloaded = _train(model, zo2=True, perturbation_scope=scope)
    resident = _train(_lora(arch), zo2=False)
    assert torch.equal(masters(offloaded), masters(resident))
    assert all(torch.equal(p.detach(), base[n]) for n, p in model.named_parameters() if n in base)
    trained = _adapter(model)
    assert set(trained) == set(start) and all("lora_" in n for n in trained)
    assert any(not torch.equal(trained[n], start[n]) for n in trained)
    up, down = offloaded.bytes_moved()
    assert up > 0 and down == 0  # adapters resident: the frozen base only streams up


def test_ia3_trains_its_scaling_vectors():
    model = _ia3()
    start = _adapter(model)
    engine = _train(model, zo2=True)
    assert engine.scope == "unit"  # IA3 reads its vectors from a ParameterDict, outside any module call
    assert any(not torch.equal(p.detach(), start[n]) for n, p in model.named_parameters() if n in start)
    assert torch.equal(masters(engine), masters(_train(_ia3(), zo2=False)))


def test_the_adapter_saves_as_a_normal_peft_adapter_merges_and_replays(tmp_path):
    model = _lora("llama")
    engine = _train(model, zo2=True)
    trained = _adapter(model)
    batch = make_batch()
    logits = engine.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    engine.detach().save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    loaded = peft.PeftModel.from_pretrained(make_model("llama", num_hidden_layers=3), tmp_path / "adapter")
    for name, param in loaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(param.detach(), trained[name]), name
    loaded.eval()
    with torch.no_grad():
        again = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        merged = loaded.merge_and_unload()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(again, logits)
    torch.testing.assert_close(merged, logits, rtol=1e-5, atol=1e-5)  # merging re-rounds W + BA
    rebuilt = replay(_lora("llama"), engine.history, engine.config)  # same initial adapter (seeded)
    assert _adapter(rebuilt.detach()).keys() == trained.keys()
    assert all(torch.equal(p.detach(), trained[n]) for n, p in rebuilt.model.named_parameters() if n in trained)


def test_zo_init_and_the_trainer_take_a_peft_model(tmp_path):
    from transformers import TrainingArguments

    from zo2 import ZOTrainer, attach_zo_methods

    model = attach_zo_methods(_lora("llama"))
    start = _adapter(model)
    model.zo_init(ZOConfig(**CONFIG))
    batch = make_batch()
    rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["input_ids"]))]
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True)
    ZOTrainer(model, args=args, train_dataset=rows).train()
    assert any(not torch.equal(p.detach(), start[n]) for n, p in model.named_parameters() if n in start)


def test_a_frozen_base_can_be_stored_in_a_lower_precision_than_the_adapter():
    """frozen_dtype="bfloat16": the base is stored (and streamed, and computed) in bf16, the LoRA
    adapter stays float32 (peft casts the adapter's inputs); offloaded == resident."""
    def run(zo2: bool):
        model = _lora("llama")
        frozen = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters() if not p.requires_grad}
        engine = _train(model, zo2=zo2, frozen_dtype="bfloat16")
        return engine, frozen
    engine, frozen = run(True)
    assert {u.master.dtype for u in engine.units if not u.trainable} == {torch.bfloat16}
    assert {u.master.dtype for u in engine.units if u.trainable} == {torch.float32}
    assert all(torch.equal(p.detach(), frozen[n]) for n, p in engine.model.named_parameters() if n in frozen)
    resident, _ = run(False)
    assert torch.equal(torch.cat([u.master.float() for u in resident.units]),
                       torch.cat([u.master.float() for u in engine.units]))
