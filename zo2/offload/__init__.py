"""Where each unit lives and how it moves: placement (:mod:`.placement`) under the budget policy
(:mod:`.budget`), transfers through device slots (:mod:`.transfers`), the owner of unit residency
(:mod:`.residency`), and disk offload (:mod:`.disk`)."""
