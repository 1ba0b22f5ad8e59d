"""``python -m reference_pipeline``: see :mod:`reference_pipeline.cli`."""

import sys

from .cli import main

sys.exit(main())
