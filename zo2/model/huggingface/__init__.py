"""ZO2's ``zo2.model.huggingface`` paths: ``zo_init`` (``zo_hf_init``) and ``opt`` (the OPT getters)."""
