"""Disk offload: the folder of offloaded masters (:mod:`.store`), its write-ahead journal of updates
(:mod:`.journal`), the transfers that stream units through staging buffers (:mod:`.staging`), and the
aligned host buffers O_DIRECT reads land in (:mod:`.aligned`), and the weights read back into host memory
when a disk engine is detached (:mod:`.materialise`)."""
