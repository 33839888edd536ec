"""napari-unet: annotate a few cells, fine-tune a bundled U-Net, segment whole stacks.

Importing the package changes nothing in the host process (napari included): the OpenMP
wait policy is set by the ``napari-unet`` command and the benchmark scripts only, see
:mod:`napari_unet.cli`.
"""

__version__ = "0.1.0"
