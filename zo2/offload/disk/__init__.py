"""Disk offload: the folder zo2 owns and its lock (:mod:`.folder`), the offloaded masters in it
(:mod:`.store`), its write-ahead journal of updates (:mod:`.journal`), the transfers that stream units
through staging buffers (:mod:`.staging`), the aligned host buffers O_DIRECT reads land in
(:mod:`.aligned`), and the weights read back into host memory when a disk engine is detached
(:mod:`.materialise`)."""
