"""The run writer's chunk-at-a-time appender against plain numpy: whatever sequence of appends,
flushes, reopenings and rewinds, the dataset holds exactly the rows last written there."""

from __future__ import annotations

from collections import Counter

import h5py
import numpy as np
import pytest

from workbench.store import schema as S
from workbench.store.reader import open_run
from workbench.store.synthetic import write_synthetic_run
from workbench.store.chunks import ChunkAppender as _ChunkAppender


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


def test_reserve_grows_to_the_expected_rows_then_doubles_in_whole_chunks(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w", libver="latest") as f:
        ds = _dataset(f, "x", (2,), 8, "float32")
        app = _ChunkAppender(ds, expected_rows=100)
        app.reserve(0)
        assert ds.shape[0] == 0  # nothing asked, nothing grown
        app.reserve(5)
        assert ds.shape[0] == app.extent == 104  # the expected rows, rounded up to whole chunks
        app.reserve(104)
        assert ds.shape[0] == 104
        app.reserve(105)
        assert ds.shape[0] == 208
        app.reserve(1000)
        assert ds.shape[0] == 1000


def test_activation_extents_grow_in_steps_and_end_at_the_committed_rows(tmp_path, monkeypatch):
    """Activation datasets are not resized per batch; a reader during the capture sees exactly
    the committed prompts (it goes by the offsets, not the extents), and after the clean close
    every dataset ends at its committed rows."""
    resizes: Counter[str] = Counter()
    real_resize = h5py.Dataset.resize

    def counting_resize(self, size, axis=None):
        resizes[self.name] += 1
        return real_resize(self, size, axis)

    monkeypatch.setattr(h5py.Dataset, "resize", counting_resize)
    out = tmp_path / "r.h5"
    partial = out.with_name(out.name + S.PARTIAL_SUFFIX)

    def planted(i, acts):
        return np.full_like(acts, i) + np.arange(len(acts), dtype=np.float32)[:, None] / 64

    seen = {}

    def edit(i, hook, acts):
        if i == 30 and hook == "hook_embed":  # prompts 0-29 are committed: read them live
            with open_run(partial) as run:
                seen["n"] = run.n_prompts
                seen["equal"] = all(np.array_equal(run.activation(h, j), planted(j, run.activation(h, j)))
                                    for j in range(run.n_prompts)
                                    for h in ("hook_embed", "blocks.1.hook_resid_post"))
            with h5py.File(partial, "r", swmr=True) as f:
                seen["extent"] = f["acts/hook_embed"].shape[0]
                seen["committed"] = int(f[S.TOKEN_OFFSETS][-1])
        return planted(i, acts)

    n_batches = -(-50 // 2)
    write_synthetic_run(out, n_prompts=50, batch_size=2, n_layers=2, edit=edit)
    assert seen["n"] == 30 and seen["equal"]
    assert seen["extent"] > seen["committed"]  # reserved ahead of the commits
    for name in ("/acts/hook_embed", "/acts/blocks.1.hook_resid_post", "/acts/blocks.0.attn.hook_pattern"):
        assert 2 <= resizes[name] <= 12 < n_batches, (name, resizes[name])
    with open_run(out) as run, h5py.File(out, "r") as f:
        assert run.n_prompts == 50
        total = int(f[S.TOKEN_OFFSETS][-1])
        assert f["acts/hook_embed"].shape == (total, 16)
        assert f["acts/blocks.1.hook_resid_post"].shape == (total, 16)
        assert f["acts/blocks.0.attn.hook_pattern"].shape == (int(f["acts_offsets/blocks.0.attn.hook_pattern"][-1]),)
        for j in range(50):
            np.testing.assert_array_equal(run.activation("hook_embed", j),
                                          planted(j, np.zeros((run.n_tokens(j), 16), np.float32)))


def test_vocabulary_strings_are_each_id_decoded_alone(tiny_models):
    for name, model in tiny_models.items():
        vocab = model.vocab_strings()
        assert vocab == [model.tokenizer.decode([i]) for i in range(len(model.tokenizer))], name
        assert model.vocab_strings() is vocab  # computed once


def _datasets(f: h5py.File) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_batches_committed_together_store_what_one_commit_per_batch_stores(tmp_path):
    """Three batches written, then one commit for all of them: the finished file holds exactly
    the bytes of one commit per batch, and a reader in between sees only whole commits."""
    seen: list[int] = []
    partial = tmp_path / ("grouped.h5" + S.PARTIAL_SUFFIX)

    def watch(i, hook, acts):
        if hook == "hook_embed" and i % 2 == 0:  # the first prompt of each batch of 2
            with open_run(partial) as run:
                seen.append(run.n_prompts)
        return acts

    one = write_synthetic_run(tmp_path / "one.h5", n_prompts=21, batch_size=2, seed=3)
    grouped = write_synthetic_run(tmp_path / "grouped.h5", n_prompts=21, batch_size=2, seed=3,
                                  commit_every=3, edit=watch)
    assert seen == [0, 0, 0, 6, 6, 6, 12, 12, 12, 18, 18]  # 21 prompts: 11 batches, 4 commits
    with h5py.File(one, "r") as a, h5py.File(grouped, "r") as b:
        da, db = _datasets(a), _datasets(b)
        assert sorted(da) == sorted(db)
        for name in da:
            np.testing.assert_array_equal(da[name], db[name], err_msg=name)
    with open_run(grouped) as run:
        assert run.n_prompts == 21 and run.status == "complete"


def test_a_commit_needs_every_activation_of_its_batches_written(tmp_path):
    """Committing a batch whose activations were not all written is a bug, caught before the
    commit marker moves."""
    from workbench.store.writer import BatchRecord, RunWriter

    hook = S.HookSpec("hook_embed", "token", (4,), ("pos", "d_model"))
    writer = RunWriter(tmp_path / "r.h5", model_info={}, settings={}, hooks=[hook], planned_prompts=2,
                       storage_dtype="float32", compression=None, tool_version="test")

    def record(i: int) -> BatchRecord:
        return BatchRecord(prompt_ids=[f"p{i}"], texts=["x"], metas=["{}"],
                           tokens={S.MAIN: [np.arange(3, dtype=np.int32)]},
                           str_tokens={S.MAIN: [["a", "b", "c"]]}, n_input=[3])

    writer.write_act("hook_embed", np.ones((3, 4), np.float32))  # batch 0 only
    with pytest.raises(RuntimeError, match="not all written"):
        writer.commit(BatchRecord.merge([record(0), record(1)]))
    writer.commit(record(0))
    assert writer.n_prompts == 1
    writer.close()
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert f[S.TOKEN_OFFSETS][()].tolist() == [0, 3]
        assert f["acts/hook_embed"].shape == (3, 4)


# --- the typed settings contract ------------------------------------------------------------------


def _rewrite_settings(path, change) -> None:
    import json

    with h5py.File(path, "r+") as f:
        doc = json.loads(f[S.META_SETTINGS][()].decode())
        change(doc)
        raw = json.dumps(doc).encode()
        del f[S.META_SETTINGS]
        f.create_dataset(S.META_SETTINGS, data=np.array(raw, dtype=h5py.string_dtype("utf-8", len(raw))))


def test_settings_are_typed_and_versioned(tmp_path):
    from workbench.errors import UserError
    from workbench.store.settings import SETTINGS_VERSION, RunSettings

    path = write_synthetic_run(tmp_path / "s.h5", n_prompts=2)
    with open_run(path) as run:
        s = run.capture_settings
        assert isinstance(s, RunSettings) and s.settings_version == SETTINGS_VERSION
        assert (run.family, run.model_name, s.top_k, s.lm_target) == ("decoder", "synthetic", 5, "next")
        assert RunSettings.from_dict(s.to_dict()) == s  # the document round-trips

    # A run from before the settings were versioned: no version, no family, no model, no BOS.
    def old(doc):
        for key in ("settings_version", "family", "model", "bos"):
            doc.pop(key)

    _rewrite_settings(path, old)
    with open_run(path) as run:
        s = run.capture_settings
        assert s.settings_version == 0 and s.bos is None  # a reload takes the source's default
        assert (run.family, run.model_name) == ("decoder", "synthetic")  # from model_info

    _rewrite_settings(path, lambda doc: doc.update(settings_version=SETTINGS_VERSION + 1))
    with pytest.raises(UserError, match=r"settings are version 2; .* \(upgrade workbench\)"):
        open_run(path)
