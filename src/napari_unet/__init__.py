"""napari-unet: annotate a few cells, fine-tune a bundled U-Net, segment whole stacks."""

__version__ = "0.1.0"
