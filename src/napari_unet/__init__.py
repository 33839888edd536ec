"""napari-unet: annotate a few cells, fine-tune a bundled U-Net, segment whole stacks."""

import os

# OpenMP's default wait policy spins at every barrier; when any other process or thread
# (napari's GUI included) holds a core, each torch op then waits for a lost time slice:
# inference on 2 cores fell from 2.3-3.3 to 0.26 MP/s in benchmarks/bench_inference.py's
# threading probe. Passive waiting cost nothing measurable on a quiet machine. It only takes
# effect if torch is not imported yet, and a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
