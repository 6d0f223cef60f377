"""``python -m zo2``: the zo2 command line (see :mod:`zo2.cli`)."""
from .cli import main

raise SystemExit(main())
