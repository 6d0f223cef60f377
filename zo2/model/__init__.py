"""ZO2's ``zo2.model`` paths: ``huggingface`` (``zo_init``, ``opt``) and ``nanogpt``, over zo2's own code."""
