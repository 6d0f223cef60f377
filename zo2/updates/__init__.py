"""What a run's updates are made of: counter-based noise z (:mod:`.noise`), the update log that owns every
update and each unit's applied position (:mod:`.log`), and the lr/eps schedules (:mod:`.schedules`).

This package imports nothing else of zo2: every other package may depend on it."""
