"""``python -m liftplus_fast`` runs the ``liftplus-fast`` command line."""

import sys

from .cli import main

sys.exit(main())
