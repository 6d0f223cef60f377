"""nanoGPT at ZO2's paths: ``zo2.model.nanogpt.model`` (``GPT``, ``GPTConfig``, ``GPTConfigs``) and
``zo2.model.nanogpt.mezo_sgd`` (``get_nanogpt_mezo_sgd``)."""
