"""napari-unet: annotate a few cells, fine-tune a bundled U-Net, segment whole stacks."""

import os

# OpenMP's default wait policy spins at every barrier; when any other process or thread
# (napari's GUI included) holds a core, each torch op then waits for a lost time slice: on a
# 2-core machine with one core busy, training fell to 0.54 steps/s against 12.9 with one
# thread, and inference to 0.26 MP/s (benchmarks/README.md). Passive waiting costs 0-25 % on
# a quiet machine, a price worth paying to never fall off that cliff on a shared desktop. It
# only takes effect if torch is not imported yet, and a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
