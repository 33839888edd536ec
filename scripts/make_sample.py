"""Recipe for the bundled sample: a 256x256 crop of StarDist's nuclei2d demo image.

Source: dsb_nuclei_demo/nuclei2d.tif in ../shared/data — the 2D demo image shipped with
StarDist (BSD-3-Clause), itself from the Data Science Bowl 2018 (BBBC038, CC0). The sparse
annotation paints 12 of the crop's nuclei (labels 2..13) from the ground truth plus
background strokes (label 1); everything else is 0 = not annotated. The full ground truth of
the crop ships too, for evaluation only.

    python scripts/make_sample.py
"""

from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

Y, X, SIZE, N_CELLS = 256, 0, 256, 12
OUT = Path(__file__).resolve().parents[1] / "src" / "napari_unet" / "data"


def main() -> None:
    root = SHARED / "dsb_nuclei_demo"
    image = tifffile.imread(root / "images" / "nuclei2d.tif")[Y : Y + SIZE, X : X + SIZE]
    labels = tifffile.imread(root / "labels" / "nuclei2d.tif")[Y : Y + SIZE, X : X + SIZE]
    rng = np.random.default_rng(0)
    ids = [i for i in np.unique(labels) if i]
    chosen = rng.choice(ids, N_CELLS, replace=False)
    ann = np.zeros(labels.shape, np.uint16)
    for k, lab in enumerate(chosen):
        ann[labels == lab] = k + 2
    painted = ann >= 2
    # A ring of background around painted nuclei and a few strokes far from any nucleus.
    ring = ndi.binary_dilation(painted, iterations=3) & (labels == 0)
    ann[ring] = 1
    strokes = np.zeros_like(painted)
    for y in range(20, SIZE, 60):
        strokes[y : y + 4, 10 : SIZE - 10] = True
    far = ~ndi.binary_dilation(labels > 0, iterations=2)
    ann[strokes & far] = 1
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"source": "StarDist nuclei2d demo (BSD-3-Clause), from DSB 2018 (CC0)",
            "crop": [Y, X, SIZE, SIZE]}
    tifffile.imwrite(OUT / "nuclei_crop.tif", image, compression="zlib", metadata=meta)
    tifffile.imwrite(OUT / "nuclei_crop_annotation.tif", ann, compression="zlib")
    tifffile.imwrite(OUT / "nuclei_crop_labels.tif", labels.astype(np.uint16),
                     compression="zlib")
    print(f"{len(ids)} nuclei in crop, {N_CELLS} painted, {int((ann == 1).sum())} bg px")


if __name__ == "__main__":
    main()
