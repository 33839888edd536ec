"""The public data loaders (skipped when ../shared/data is absent) and the split."""

from __future__ import annotations

import numpy as np
import pytest
from shared_data import DATASETS, Sample, load_dataset, load_nuclei3d, split

EXPECTED_COUNT = {
    "isbi2012_em": 20,
    "gowt1_nuclei": 6,
    "nih3t3_nuclei": 18,
    "dsb2018_nuclei": 45,
    "dsb2018_train": 660,
    "dsb_nuclei_demo": 1,
}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_load_dataset(shared_data, name):
    samples = load_dataset(name, shared_data)
    assert len(samples) == EXPECTED_COUNT[name]
    assert [s.name for s in samples] == sorted(s.name for s in samples)
    for s in samples:
        assert s.dataset == name
        assert s.image.ndim == 2 and s.image.shape == s.labels.shape
        assert s.labels.dtype == np.int32 and s.labels.min() == 0
        assert len(np.unique(s.labels)) - 1 > 0
        if name == "isbi2012_em":
            assert s.image.dtype == np.uint8
            assert s.labels.max() > 10  # connected components of the interior
        if s.image.dtype == np.float32:
            assert name == "dsb2018_nuclei" and s.image.min() >= 0 and s.image.max() <= 255
        if s.inverted:
            assert name == "dsb2018_nuclei"


def test_dsb_inversion(shared_data):
    samples = load_dataset("dsb2018_nuclei", shared_data)
    inverted = [s for s in samples if s.inverted]
    assert 0 < len(inverted) < len(samples)
    for s in inverted:  # after inversion nuclei are brighter than the background
        assert s.image[s.labels > 0].mean() > s.image[s.labels == 0].mean()
    raw = {s.name: s for s in load_dataset("dsb2018_nuclei", shared_data, invert_bright=False)}
    s = inverted[0]
    np.testing.assert_allclose(s.image, 255 - raw[s.name].image)
    assert not any(r.inverted for r in raw.values())


def test_nuclei3d(shared_data):
    s = load_nuclei3d(shared_data)
    assert s.image.shape == s.labels.shape == (31, 61, 57)
    assert len(np.unique(s.labels)) - 1 == 51


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="isbi2012_em"):
        load_dataset("isbi2012_em", tmp_path)


def _fake(n: int) -> list[Sample]:
    z = np.zeros((2, 2), np.int32)
    return [Sample(f"s{i:02d}", "fake", z, z) for i in range(n)]


def test_split_deterministic():
    samples = _fake(20)
    tr, va = split(samples, 0.25, seed=0)
    assert len(va) == 5 and len(tr) == 15
    assert {s.name for s in tr}.isdisjoint(s.name for s in va)
    tr2, va2 = split(list(reversed(samples)), 0.25, seed=0)
    assert sorted(s.name for s in va2) == [s.name for s in va]
    assert [s.name for s in split(samples, 0.25, seed=1)[1]] != [s.name for s in va]
    assert len(split(_fake(2), 0.1)[1]) == 1
    tr1, va1 = split(_fake(1), 0.5)
    assert len(tr1) == 1 and va1 == []
