import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from memwise.core.errors import BadInputError
from memwise.data import MemmapDataset, smallest_exact_dtype


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([0, 255], dtype=np.int64), np.uint8),
        (np.array([-1, 127], dtype=np.int64), np.int8),
        (np.array([0, 256], dtype=np.int64), np.uint16),
        (np.array([-40000, 1], dtype=np.int64), np.int32),
        (np.array([2**40], dtype=np.int64), np.int64),
        (np.array([0.0, 3.0, 16.0], dtype=np.float32), np.uint8),  # whole numbers stored as integers
        (np.array([0.5, -2.25, np.nan], dtype=np.float32), np.float16),  # exact in half precision
        (np.array([0.1], dtype=np.float32), np.float32),  # 0.1 is not exact in float16
        (np.array([0.1], dtype=np.float64), np.float64),
        (np.array([True, False]), np.bool_),
    ],
)
def test_smallest_exact_dtype(values, expected):
    assert smallest_exact_dtype(values) == np.dtype(expected)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_infinity=True, allow_nan=True, width=32)), min_size=1, max_size=20))
def test_smallest_exact_dtype_is_lossless(numbers):
    values = np.array(numbers, dtype=np.float64 if any(isinstance(n, float) for n in numbers) else np.int64)
    dtype = smallest_exact_dtype(values)
    with np.errstate(invalid="ignore", over="ignore"):
        assert np.array_equal(values.astype(dtype).astype(values.dtype), values, equal_nan=values.dtype.kind == "f")
    assert dtype.itemsize <= values.dtype.itemsize


@pytest.fixture
def images_and_labels():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(50, 3, 4, 4, generator=generator)
    labels = torch.randint(0, 10, (50,), generator=generator)
    return TensorDataset(images, labels)


def test_round_trip_is_exact_and_compact(tmp_path, images_and_labels):
    dataset = MemmapDataset.write(tmp_path / "d.mm", images_and_labels)
    assert len(dataset) == 50
    for index in (0, 17, -1):
        image, label = dataset[index]
        expected_image, expected_label = images_and_labels[index]
        assert image.dtype == torch.float32 and label.dtype == torch.int64
        torch.testing.assert_close(image, expected_image, rtol=0, atol=0)
        assert label.item() == expected_label.item()
    # labels 0..9 are stored as one byte each instead of eight
    assert dataset.nbytes == 50 * 3 * 4 * 4 * 4 + 50 * 1
    assert (tmp_path / "d.mm").stat().st_size <= dataset.nbytes + 1024  # header and 64-byte alignment


def test_single_field_samples(tmp_path):
    dataset = MemmapDataset.write(tmp_path / "x.mm", [np.array([i, i + 1]) for i in range(5)])
    assert torch.equal(dataset[2], torch.tensor([2, 3]))


def test_pickling_sends_the_path_not_the_data(tmp_path, images_and_labels):
    dataset = MemmapDataset.write(tmp_path / "d.mm", images_and_labels)
    dataset[0]  # maps the file
    payload = pickle.dumps(dataset)
    assert len(payload) < 2000
    torch.testing.assert_close(pickle.loads(payload)[3][0], images_and_labels[3][0], rtol=0, atol=0)


def test_workers_read_the_same_samples(tmp_path, images_and_labels):
    dataset = MemmapDataset.write(tmp_path / "d.mm", images_and_labels)
    expected = next(iter(DataLoader(images_and_labels, batch_size=50)))
    got = next(iter(DataLoader(dataset, batch_size=50, num_workers=2)))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_refuses_to_overwrite_without_force(tmp_path, images_and_labels):
    path = tmp_path / "d.mm"
    MemmapDataset.write(path, images_and_labels)
    with pytest.raises(BadInputError, match="force=True"):
        MemmapDataset.write(path, images_and_labels)
    MemmapDataset.write(path, [np.zeros(2)], force=True)
    assert len(MemmapDataset(path)) == 1


def test_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="same shapes"):
        MemmapDataset.write(tmp_path / "a.mm", [np.zeros(2), np.zeros(3)])
    with pytest.raises(BadInputError, match="non-empty"):
        MemmapDataset.write(tmp_path / "b.mm", [])
    (tmp_path / "c.mm").write_bytes(b"not a dataset at all")
    with pytest.raises(BadInputError, match="not a MemmapDataset"):
        MemmapDataset(tmp_path / "c.mm")
    with pytest.raises(BadInputError, match="does not exist"):
        MemmapDataset(tmp_path / "missing.mm")
