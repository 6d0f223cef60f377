"""A model as zo2 holds it: its partition into units [embedding, block 0 ... block L-1, head]
(:mod:`.partition`), each unit's parameters in one flat master buffer, and the reusable device slots
and working buffers (:mod:`.storage`)."""
