"""Files on disk: durable writes (:mod:`.durable`), checkpoint manifests (:mod:`.manifest`), safetensors
shards read and written without a second copy (:mod:`.shards`), a cheap fingerprint of a model's weights
(:mod:`.fingerprint`), and the private APIs of transformers
that loading and the Trainer need, each behind a version guard (:mod:`.compat`).

Nothing here knows the engine: :mod:`zo2.loading` and :mod:`zo2.checkpoint` build on it."""
