"""``python -m reference_pipeline``: see :mod:`reference_pipeline.cli`."""

import os
import sys

# Idle OpenMP threads sleep instead of spinning: with a DataLoader worker beside two compute threads
# on a 2-core machine, spinning threads made a training step take 62 s instead of 4 s. Must be set
# before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # a torchrun worker: DDP leaves gloo threads running after the group is destroyed, and a normal
    # interpreter exit now and then aborts on them (see engine.exit_process)
    from .engine import exit_process

    exit_process(code)
sys.exit(code)
