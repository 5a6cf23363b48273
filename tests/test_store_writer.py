"""The run writer's chunk-at-a-time appender against plain numpy: whatever sequence of appends,
flushes, reopenings and rewinds, the dataset holds exactly the rows last written there."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from workbench.store.writer import _ChunkAppender


def _dataset(f: h5py.File, name: str, feature: tuple[int, ...], chunk_rows: int, dtype: str):
    return f.create_dataset(name, shape=(0, *feature), maxshape=(None, *feature),
                            chunks=(chunk_rows, *feature), dtype=dtype)


@pytest.mark.parametrize("feature, dtype", [((), "float32"), ((3, 5), "float32"), ((4,), "uint16"),
                                            ((2,), "int64")])
def test_appends_equal_numpy_whatever_the_write_sizes(tmp_path, feature, dtype):
    rng = np.random.default_rng(0)
    expected = np.zeros((0, *feature), dtype)
    with h5py.File(tmp_path / "a.h5", "w", libver="latest") as f:
        ds = _dataset(f, "x", feature, 7, dtype)
        app = _ChunkAppender(ds)
        for _ in range(60):
            n = int(rng.choice([0, 1, 3, 7, 8, 20]))  # within, exactly, across several chunks
            values = (rng.standard_normal((n, *feature)) * 1000).astype(dtype)
            start = len(expected)
            ds.resize(start + n, axis=0)
            app.write(start, values)
            expected = np.concatenate([expected, values])
            if rng.random() < 0.5:  # a commit: the partial chunk goes to the file
                app.flush()
                np.testing.assert_array_equal(ds[:], expected)
        app.flush()
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert f["x"].shape == expected.shape
        np.testing.assert_array_equal(f["x"][:], expected)


def test_a_new_appender_continues_a_partly_filled_chunk_and_a_rewind_overwrites(tmp_path):
    """Resume copies committed rows with ordinary writes and continues with a fresh appender
    mid-chunk; rows of a batch that was never committed are written over by the next."""
    rng = np.random.default_rng(1)
    first = rng.standard_normal((10, 4)).astype("float32")
    with h5py.File(tmp_path / "b.h5", "w", libver="latest") as f:
        ds = _dataset(f, "x", (4,), 8, "float32")
        ds.resize(10, axis=0)
        ds[:] = first  # rows 0-9: chunk 0 full, chunk 1 holds 2 rows
        app = _ChunkAppender(ds)
        more = rng.standard_normal((5, 4)).astype("float32")
        ds.resize(15, axis=0)
        app.write(10, more)
        app.flush()
        np.testing.assert_array_equal(ds[:], np.concatenate([first, more]))
        # rows 15-18 written but not committed, then the next batch starts again at 15
        ds.resize(19, axis=0)
        app.write(15, np.full((4, 4), 9, "float32"))
        redo = rng.standard_normal((3, 4)).astype("float32")
        ds.resize(18, axis=0)
        app.write(15, redo)
        app.flush()
        # and a rewind into an earlier chunk, which is read back from the file
        back = rng.standard_normal((2, 4)).astype("float32")
        ds.resize(6, axis=0)
        app.write(4, back)
        app.flush()
        expected = np.concatenate([first[:4], back])
        np.testing.assert_array_equal(ds[:], expected)


def test_vocabulary_strings_are_each_id_decoded_alone(tiny_models):
    for name, model in tiny_models.items():
        vocab = model.vocab_strings()
        assert vocab == [model.tokenizer.decode([i]) for i in range(len(model.tokenizer))], name
        assert model.vocab_strings() is vocab  # computed once
