"""The import paths users' code and the docs name keep working: each resolves to the one implementation
(a re-export, never a copy), and renamed public names still resolve, with a DeprecationWarning."""
import importlib

import pytest

import zo2

#: Documented module -> names imported from it (README, docs, ZO2's own paths), and where each really lives.
DOCUMENTED = {
    "zo2.loading": {"from_pretrained": "zo2.loading", "from_checkpoint": "zo2.loading",
                    "save_pretrained": "zo2.loading", "stream_model": "zo2.loading"},
    "zo2.checkpoint": {"save_checkpoint": "zo2.checkpoint", "load_checkpoint": "zo2.checkpoint",
                       "latest_checkpoint": "zo2.checkpoint", "save_seed_log": "zo2.checkpoint",
                       "read_seed_log": "zo2.checkpoint", "replay_seed_log": "zo2.checkpoint",
                       "CheckpointError": "zo2.persist.manifest", "MANIFEST_NAME": "zo2.persist.manifest",
                       "write_manifest": "zo2.persist.manifest", "verify_manifest": "zo2.persist.manifest"},
    "zo2.distributed": {"role_for": "zo2.distributed", "shard_batch": "zo2.distributed",
                        "init_from_env": "zo2.distributed", "save_checkpoint": "zo2.distributed",
                        "restore_checkpoint": "zo2.distributed", "is_main_process": "zo2.distributed"},
    "zo2.plan": {"make_plan": "zo2.plan", "meta_model": "zo2.plan", "Machine": "zo2.plan", "Plan": "zo2.plan",
                 "opt_config": "zo2.plan", "block_locations": "zo2.offload.budget",
                 "model_sizes": "zo2.offload.budget", "BudgetError": "zo2.offload.budget",
                 "resolve_scope": "zo2.offload.budget", "walk_shape": "zo2.offload.budget"},
    "zo2.kernels": {"update_and_perturb": "zo2.kernels", "apply_updates": "zo2.kernels", "generate": "zo2.kernels",
                    "resolve": "zo2.kernels", "warm_up": "zo2.kernels"},
    "zo2.trainer.hf_transformers": {"ZOTrainer": "zo2.trainer.hf_transformers.trainer"},
    "zo2.trainer.hf_trl": {"ZOSFTTrainer": "zo2.trainer.hf_trl.sft_trainer"},
    "zo2.trainer": {"ZOTrainer": "zo2.trainer.hf_transformers.trainer", "ZOSFTTrainer": "zo2.trainer.hf_trl.sft_trainer"},
    # ZO2's own import paths (its README, tutorials, examples and tests)
    "zo2.trainer.hf_transformers.trainer": {"ZOTrainer": "zo2.trainer.hf_transformers.trainer"},
    "zo2.trainer.hf_trl.sft_trainer": {"ZOSFTTrainer": "zo2.trainer.hf_trl.sft_trainer"},
    "zo2.utils": {"seed_everything": "zo2.utils.utils"},
    "zo2.utils.utils": {"seed_everything": "zo2.utils.utils"},
    "zo2.config.mezo_sgd": {"MeZOSGDConfig": "zo2.config.mezo_sgd"},
    "zo2.model.huggingface.zo_init": {"zo_hf_init": "zo2.hf"},
    "zo2.model.huggingface.opt": {name: "zo2.model.huggingface.opt" for name in (
        "get_opt_for_causalLM", "get_opt_for_sequence_classification", "get_opt_for_question_answering")},
    "zo2.model.nanogpt.model": {"GPT": "zo2.model.nanogpt.model", "GPTConfig": "zo2.model.nanogpt.model",
                                "GPTConfigs": "zo2.model.nanogpt.model"},
    "zo2.model.nanogpt.mezo_sgd": {"get_nanogpt_mezo_sgd": "zo2.model.nanogpt.mezo_sgd"},
    "zo2.hf": {"zo_hf_init": "zo2.hf", "attach_zo_methods": "zo2.hf", "engine_for_this_process": "zo2.hf"},
    "zo2.objectives": {"objective": "zo2.objectives.base", "Objective": "zo2.objectives.base",
                       "candidate_cross_entropy": "zo2.objectives.classification",
                       "TASK_LOSS": "zo2.objectives.task_loss"},
    "zo2.methods": {"METHODS": "zo2.methods", "Method": "zo2.methods.base", "Part": "zo2.methods.base"},
    "zo2.config": {"ZOConfig": "zo2.config", "ZOConfigError": "zo2.config"},
    "zo2": {"ZOConfig": "zo2.config", "ZOEngine": "zo2.engine", "replay": "zo2.engine", "zo_hf_init": "zo2.hf",
            "StepResult": "zo2.result", "Update": "zo2.updates.log", "UpdateLog": "zo2.updates.log",
            "Role": "zo2.walk.role", "METHODS": "zo2.methods", "objective": "zo2.objectives.base",
            "find_partition": "zo2.units.partition", "BatchLayoutError": "zo2.walk.batching",
            "ZOTrainer": "zo2.trainer.hf_transformers.trainer", "ZOSFTTrainer": "zo2.trainer.hf_trl.sft_trainer",
            "get_opt_for_causalLM": "zo2.model.huggingface.opt", "get_nanogpt_mezo_sgd": "zo2.model.nanogpt.mezo_sgd",
            "get_opt_for_sequence_classification": "zo2.model.huggingface.opt",
            "get_opt_for_question_answering": "zo2.model.huggingface.opt"},
}


@pytest.mark.parametrize("path", sorted(DOCUMENTED))
def test_documented_names_import_from_their_documented_paths(path):
    module = importlib.import_module(path)
    for name, home in DOCUMENTED[path].items():
        value = getattr(module, name)
        assert value is getattr(importlib.import_module(home), name), f"{path}.{name} is not {home}.{name}"


def test_the_public_api_lists_only_names_that_exist():
    assert set(zo2.__all__) <= set(dir(zo2)) | {"ZOTrainer", "ZOSFTTrainer"}
    for name in zo2.__all__:
        getattr(zo2, name)


def test_a_renamed_public_name_still_resolves_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="zo2.BatchLayoutError"):
        old = zo2.DualForwardError
    assert old is zo2.BatchLayoutError
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        zo2.NoSuchName


def test_the_zo2_command_and_python_dash_m_share_one_entry_point():
    from zo2 import cli
    from zo2.cli.main import main

    assert cli.main is main
