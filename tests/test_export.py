"""``workbench export`` / :func:`workbench.store.export.export`, ``Run.to_xarray`` and the
hdf5plugin compression codecs.

Every exported value is compared with the run read another way: ``Run.activation`` per prompt
(concatenated by hand), or the HDF5 file itself through h5py with the offsets indexed by hand,
never with the exporter's own reads. The arrow layout is checked against SAELens' (its
``CacheActivationsRunner`` features and what its ``ActivationsStore`` checks when it loads a
cache), since SAELens itself cannot be installed beside TransformerLens 4.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.clitools import run_cli
from workbench.errors import UserError
from workbench.store import open_run
from workbench.store.export import export
from workbench.store.synthetic import write_synthetic_run

datasets = pytest.importorskip("datasets")
xr = pytest.importorskip("xarray")
hdf5plugin = pytest.importorskip("hdf5plugin")

RESID = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "run.h5"
    return write_synthetic_run(path, n_prompts=30, n_layers=3, d_model=8, lengths=(3, 20), seed=4)


def _by_hand(run, hook):
    """Every token's row, prompt by prompt, through Run.activation."""
    return np.concatenate([run.activation(hook, i) for i in range(len(run))])


def _ids_by_hand(run):
    return np.concatenate([run.tokens(i) for i in range(len(run))])


# --- arrow: SAELens' cached activations --------------------------------------------------------

def test_arrow_pack_loads_with_load_from_disk_and_equals_the_run(syn, tmp_path):
    from datasets import Array2D, Sequence, Value

    with open_run(syn) as run:
        res = export(run, ["blocks.*.hook_resid_post"], tmp_path / "ds", context=16, batch_bytes=2000)
        hooks = [f"blocks.{k}.hook_resid_post" for k in range(3)]
        ds = datasets.load_from_disk(str(tmp_path / "ds"))
        # SAELens' CacheActivationsRunner features, exactly: a column per hook, then token_ids.
        assert ds.features == datasets.Features(
            {**{h: Array2D(shape=(16, 8), dtype="float32") for h in hooks},
             "token_ids": Sequence(Value("int32"), length=16)})
        total = run.n_tokens_total()
        assert len(ds) == res.rows == total // 16 and res.dropped_tokens == total % 16
        assert len(list((tmp_path / "ds").glob("data-*.arrow"))) == 1
        ds.set_format("numpy")
        block = ds[:]
        for h in hooks:
            assert block[h].dtype == np.float32
            np.testing.assert_array_equal(block[h].reshape(-1, 8), _by_hand(run, h)[: res.rows * 16])
        np.testing.assert_array_equal(block["token_ids"].reshape(-1), _ids_by_hand(run)[: res.rows * 16])
        meta = json.loads((tmp_path / "ds" / "workbench_export.json").read_text())
        assert meta["run_id"] == run.run_id and meta["context"] == 16 and meta["rows"] == "pack"


def test_arrow_reads_as_saelens_activations_store_reads_it(syn, tmp_path):
    """What sae_lens.training.activations_store.ActivationsStore does with a cache folder."""
    torch = pytest.importorskip("torch")
    with open_run(syn) as run:
        export(run, [RESID], tmp_path / "cache", context=8)
        ds = datasets.load_from_disk(str(tmp_path / "cache"))
        columns = [RESID] + (["token_ids"] if "token_ids" in ds.column_names else [])
        ds.set_format(type="torch", columns=columns, device="cpu", dtype=torch.float32)
        assert ds.features[RESID].shape == (8, 8)  # (context_size, d_in)
        buf = ds[0:4]
        acts = buf[RESID]
        assert acts.shape == (4, 8, 8)
        ids = buf["token_ids"]
        assert ids.shape == (4, 8)
        np.testing.assert_array_equal(acts.reshape(32, 8).numpy(), _by_hand(run, RESID)[:32])
        np.testing.assert_array_equal(ids.reshape(32).numpy(), _ids_by_hand(run)[:32])


def test_arrow_prompt_rows_skip_short_prompts(syn, tmp_path):
    with open_run(syn) as run:
        res = export(run, "hook_embed", tmp_path / "ds", context=12, rows="prompt")
        long = [i for i in range(len(run)) if run.n_tokens(i) >= 12]
        assert res.rows == len(long) and res.skipped_prompts == len(run) - len(long) > 0
        ds = datasets.load_from_disk(str(tmp_path / "ds")).with_format("numpy")[:]
        for r, i in enumerate(long):
            np.testing.assert_array_equal(ds["hook_embed"][r], run.activation("hook_embed", i)[:12])
            np.testing.assert_array_equal(ds["token_ids"][r], run.tokens(i)[:12])
        meta = json.loads((tmp_path / "ds" / "workbench_export.json").read_text())
        assert meta["row_prompts"] == long


def test_arrow_splits_into_shards_like_save_to_disk(syn, tmp_path, monkeypatch):
    import workbench.store.export as ex

    monkeypatch.setattr(ex, "SHARD_BYTES", 5 * 4 * (4 + 8 * 4))  # 5 rows of 4 tokens a shard
    with open_run(syn) as run:
        res = export(run, RESID, tmp_path / "ds", context=4, batch_bytes=7 * 4 * 36)
        files = sorted(p.name for p in (tmp_path / "ds").glob("data-*.arrow"))
        assert len(files) == -(-res.rows // 5) and files[-1] == f"data-{len(files) - 1:05d}-of-{len(files):05d}.arrow"
        ds = datasets.load_from_disk(str(tmp_path / "ds")).with_format("numpy")[:]
        np.testing.assert_array_equal(ds[RESID].reshape(-1, 8), _by_hand(run, RESID)[: res.rows * 4])


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, workbench_tiny_model):
    import workbench

    out = tmp_path_factory.mktemp("bf16") / "r.h5"
    workbench.capture(workbench_tiny_model, ["The capital of France is Paris", "one two three four five",
                                             "a b c d e f g h i j"],
                      hooks=["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"], out=out,
                      dtype="bfloat16", progress=False)
    return out


def test_bfloat16_and_per_head_hooks(bf16_run, tmp_path):
    """A bfloat16 run exports as float32 (exactly its values); hook_z's (head, d_head) is
    flattened to d_in = heads * d_head in C order, as SAELens flattens hook_z."""
    with open_run(bf16_run) as run:
        assert run.storage_dtype == "bfloat16"
        z = "blocks.1.attn.hook_z"
        heads, d_head = run.resolve(z).feature_shape
        res = export(run, [z, "blocks.0.hook_resid_post"], tmp_path / "ds", context=4)
        ds = datasets.load_from_disk(str(tmp_path / "ds"))
        assert ds.features[z].shape == (4, heads * d_head) and ds.features[z].dtype == "float32"
        got = ds.with_format("numpy")[:][z].reshape(-1, heads, d_head)
        want = _by_hand(run, z)[: res.rows * 4]
        np.testing.assert_array_equal(got, want)
        # the stored raw bits, widened by hand: bfloat16 is the top half of a float32
        raw = h5py.File(run.path)[f"acts/{z}"][: res.rows * 4]
        np.testing.assert_array_equal(got, (raw.astype(np.uint32) << 16).view(np.float32))


# --- npy and safetensors -----------------------------------------------------------------------

def test_npy_file_set(syn, tmp_path):
    with open_run(syn) as run:
        export(run, ["hook_embed", RESID], tmp_path / "np", format="npy", batch_bytes=100)
        names = sorted(p.name for p in (tmp_path / "np").iterdir())
        assert names == sorted(["hook_embed.npy", f"{RESID}.npy", "token_ids.npy", "offsets.npy",
                                "workbench_export.json"])
        offsets = np.load(tmp_path / "np" / "offsets.npy")
        ids = np.load(tmp_path / "np" / "token_ids.npy", mmap_mode="r")
        acts = np.load(tmp_path / "np" / f"{RESID}.npy", mmap_mode="r")
        assert offsets.dtype == np.int64 and ids.dtype == np.int32 and acts.shape == (offsets[-1], 8)
        for i in range(len(run)):
            np.testing.assert_array_equal(acts[offsets[i] : offsets[i + 1]], run.activation(RESID, i))
            np.testing.assert_array_equal(ids[offsets[i] : offsets[i + 1]], run.tokens(i))


def test_safetensors_reads_with_numpy_and_torch(bf16_run, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    z = "blocks.1.attn.hook_z"
    out = tmp_path / "acts.safetensors"
    with open_run(bf16_run) as run:
        export(run, [z, "blocks.0.hook_resid_post"], out, format="safetensors", batch_bytes=256)
        n = struct.unpack("<Q", out.read_bytes()[:8])[0]
        assert n % 8 == 0  # data 8-byte aligned
        with safe_open(str(out), framework="numpy") as f:
            assert set(f.keys()) == {z, "blocks.0.hook_resid_post", "token_ids", "offsets"}
            assert f.metadata()["run_id"] == run.run_id
            offsets = f.get_tensor("offsets")
            for hook in (z, "blocks.0.hook_resid_post"):
                got = f.get_tensor(hook)
                for i in range(len(run)):
                    np.testing.assert_array_equal(got[offsets[i] : offsets[i + 1]], run.activation(hook, i))
        with safe_open(str(out), framework="pt") as f:
            t = f.get_tensor(z)
            assert t.dtype == torch.float32 and tuple(t.shape) == (run.n_tokens_total(), *run.resolve(z).feature_shape)
            np.testing.assert_array_equal(t.numpy(), _by_hand(run, z))
            assert f.get_tensor("token_ids").dtype == torch.int32
            np.testing.assert_array_equal(f.get_tensor("token_ids").numpy(), _ids_by_hand(run))


def test_memory_stays_flat_for_a_run_many_batches_long(tmp_path):
    """Peak RSS while exporting ~60 MB in 1 MB batches grows by a few batches, not by the data
    (measured in a fresh process, its peak reset before each export)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    path = write_synthetic_run(tmp_path / "big.h5", n_prompts=150, n_layers=1, n_heads=1,
                               d_model=1024, lengths=(40, 60), top_k=1)
    script = textwrap.dedent(f"""
        import json
        from workbench.store import open_run
        from workbench.store.export import export
        import datasets, safetensors  # imports are not the export's memory

        def kb(key):
            return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key))

        run = open_run({str(path)!r})
        # Read once before measuring: HDF5 keeps the index of a dataset's chunks in memory once
        # read, and a synthetic run stores its token ids in tiny chunks (a capture does not).
        run.token_ids_between(0, run.n_tokens_total())
        run.rows("hook_embed", 0, 1)
        out = {{}}
        for fmt in ("arrow", "npy", "safetensors"):
            open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
            before = kb("VmRSS")
            res = export(run, ["hook_embed", "blocks.0.hook_resid_post"], {str(tmp_path)!r} + "/x." + fmt,
                         format=fmt, batch_bytes=1 << 20, **({{"context": 32}} if fmt == "arrow" else {{}}))
            out[fmt] = [res.bytes, (kb("VmHWM") - before) * 1024]
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    for fmt, (nbytes, grown) in figures.items():
        assert nbytes > 55e6, fmt
        assert grown < 24e6, f"{fmt}: peak RSS grew by {grown / 1e6:.0f} MB exporting {nbytes / 1e6:.0f} MB"


# --- refusals and the command line ------------------------------------------------------------

def test_user_errors(syn, tmp_path, monkeypatch):
    with open_run(syn) as run:
        with pytest.raises(UserError, match="was not captured"):
            export(run, "blocks.7.hook_resid_post", tmp_path / "a")
        with pytest.raises(UserError, match="per prompt"):
            export(run, "blocks.0.attn.hook_pattern", tmp_path / "a")
        with pytest.raises(UserError, match="unknown export format"):
            export(run, RESID, tmp_path / "a", format="parquet")
        with pytest.raises(UserError, match="fewer than one row"):
            export(run, RESID, tmp_path / "a", context=10**6)
        with pytest.raises(UserError, match="the run itself"):
            export(run, RESID, syn, format="safetensors", force=True)
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "mine.txt").write_text("keep")
        with pytest.raises(UserError, match="exists; use --force"):
            export(run, RESID, tmp_path / "taken")
        assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"
        export(run, RESID, tmp_path / "taken", format="safetensors", force=True)
        assert (tmp_path / "taken").is_file()
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "datasets" else real(n, *a))
        with pytest.raises(UserError, match=r"workbench\[export\]"):
            export(run, RESID, tmp_path / "b")
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial left


def test_cli(syn, tmp_path):
    out = tmp_path / "ds"
    r = run_cli("export", str(syn), "--hook", RESID, "--hook", "hook_embed", "-o", str(out),
                "--context", "8", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["rows"] == len(datasets.load_from_disk(str(out))) and doc["context"] == 8
    again = run_cli("export", str(syn), "--hook", RESID, "-o", str(out))
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "--force" in again.stderr
    bad = run_cli("export", str(syn), "--hook", "nope", "-o", str(tmp_path / "x"))
    assert bad.returncode == 2 and "was not captured" in bad.stderr
    fmt = run_cli("export", str(syn), "--hook", RESID, "--format", "csv", "-o", str(tmp_path / "x"))
    assert fmt.returncode == 2 and "csv" in fmt.stderr
    ok = run_cli("export", str(syn), "--hook", RESID, "--format", "npy", "-o", str(tmp_path / "n"))
    assert ok.returncode == 0 and "wrote" in ok.stdout
    ctx = run_cli("export", str(syn), "--hook", RESID, "--format", "npy", "--context", "4", "-o", str(tmp_path / "m"))
    assert ctx.returncode == 2 and "arrow" in ctx.stderr


# --- to_xarray ----------------------------------------------------------------------------------

def test_to_xarray_matches_the_file_indexed_by_hand(syn):
    with open_run(syn) as run, h5py.File(syn) as f:
        offsets = f["prompts/token_offsets"][:]
        raw = f[f"acts/{RESID}"][:]
        da = run.to_xarray(RESID)
        assert da.dims == ("prompt", "position", "d_model") and int(da.layer) == 0
        longest = int(np.diff(offsets).max())
        assert da.sizes["position"] == longest
        for i in range(len(run)):
            n = offsets[i + 1] - offsets[i]
            assert int(da.n_tokens.sel(prompt=i)) == n
            np.testing.assert_array_equal(da.sel(prompt=i).values[:n], raw[offsets[i] : offsets[i + 1]])
            assert np.isnan(da.sel(prompt=i).values[n:]).all()
            assert list(da.token.sel(prompt=i).values[:n]) == run.str_tokens(i)
            assert (da.token_id.sel(prompt=i).values[n:] == -1).all()
        assert list(da.prompt_id.values) == run.prompt_ids
        some = run.to_xarray(RESID, prompts=[3, 1])
        assert list(some.prompt.values) == [3, 1]
        np.testing.assert_array_equal(some.sel(prompt=1, position=2).values, raw[offsets[1] + 2])


def test_to_xarray_stacks_layers_and_labels_heads(syn):
    with open_run(syn) as run, h5py.File(syn) as f:
        offsets = f["prompts/token_offsets"][:]
        stacked = run.to_xarray("blocks.*.hook_resid_post")
        assert stacked.dims == ("layer", "prompt", "position", "d_model")
        assert list(stacked.layer.values) == [0, 1, 2]
        assert list(stacked.hook.values) == [f"blocks.{k}.hook_resid_post" for k in range(3)]
        for k in range(3):
            raw = f[f"acts/blocks.{k}.hook_resid_post"]
            np.testing.assert_array_equal(stacked.sel(layer=k, prompt=5, position=1).values, raw[offsets[5] + 1])
        listed = run.to_xarray(["blocks.2.hook_resid_post", "blocks.1.hook_resid_post"])
        assert list(listed.layer.values) == [1, 2]
        # an attention pattern: (prompt, head, query_pos, key_pos); stored as one flat block per prompt
        pat = run.to_xarray("blocks.1.attn.hook_pattern")
        assert pat.dims == ("prompt", "head", "query_pos", "key_pos") and list(pat["head"].values) == [0, 1]
        starts = f["acts_offsets/blocks.1.attn.hook_pattern"][:]
        flat = f["acts/blocks.1.attn.hook_pattern"]
        i, n = 7, offsets[8] - offsets[7]
        block = flat[starts[i] : starts[i + 1]].reshape(2, n, n)
        np.testing.assert_array_equal(pat.sel(prompt=i, head=1).values[:n, :n], block[1])
        assert np.isnan(pat.sel(prompt=i).values[:, n:, :]).all()
        with pytest.raises(UserError, match="blocks.L"):
            run.to_xarray(["hook_embed", RESID])


# --- compression through hdf5plugin -------------------------------------------------------------

def _filter_ids(ds):
    plist = ds.id.get_create_plist()
    return [plist.get_filter(k)[0] for k in range(plist.get_nfilters())]


@pytest.fixture(scope="module")
def codec_runs(tmp_path_factory, workbench_tiny_model):
    import workbench

    folder = tmp_path_factory.mktemp("codecs")
    prompts = ["The capital of France is", "When Mary and John went to the store", "one two"]
    out = {}
    for codec in ("none", "blosc2-zstd", "zstd"):
        out[codec] = folder / f"{codec}.h5"
        workbench.capture(workbench_tiny_model, prompts, hooks=["residual", "attention"],
                          out=out[codec], compression=codec, progress=False, dtype="float16")
    return out


@pytest.mark.parametrize("codec,filter_id", [("blosc2-zstd", 32026), ("zstd", 32015)])
def test_compressed_capture_reads_back_bit_identical(codec_runs, codec, filter_id):
    with open_run(codec_runs["none"]) as plain, open_run(codec_runs[codec]) as packed:
        assert packed.settings["compression"] == codec
        for hook in plain.hooks:
            assert filter_id in _filter_ids(packed.f[f"acts/{hook}"])
            for i in range(len(plain)):
                a, b = plain.activation(hook, i), packed.activation(hook, i)
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (Debian's hdf5-tools) is not installed")
@pytest.mark.parametrize("codec,filter_id", [("blosc2-zstd", 32026), ("zstd", 32015)])
def test_h5dump_lists_compressed_runs(codec_runs, codec, filter_id, tmp_path):
    path = str(codec_runs[codec])
    head = subprocess.run(["h5dump", "-p", "-H", path], capture_output=True, text=True, check=False)
    assert head.returncode == 0, head.stderr
    assert 'DATASET "blocks.0.hook_resid_post"' in head.stdout and f"FILTER_ID {filter_id}" in head.stdout
    # Values: only where HDF5_PLUGIN_PATH names hdf5plugin's compiled filters; without it, h5dump
    # prints an empty DATA block (and still exits 0).
    cmd = ["h5dump", "-d", "/acts/blocks.0.hook_resid_post", "-s", "0,0", "-c", "1,2", path]
    env = {"PATH": "/usr/bin:/bin", "HDF5_PLUGIN_PATH": str(tmp_path)}  # an empty plugin folder
    blind = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    assert "(0,0):" not in blind.stdout
    env["HDF5_PLUGIN_PATH"] = hdf5plugin.PLUGIN_PATH
    seen = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    with open_run(codec_runs[codec]) as run:
        first = run.activation("blocks.0.hook_resid_post", 0)[0, :2]
    assert seen.returncode == 0 and "(0,0):" in seen.stdout
    printed = seen.stdout.split("(0,0):")[1].split("}")[0].replace(",", " ").split()
    np.testing.assert_allclose([float(x) for x in printed], first.astype(np.float64), rtol=1e-3)


def test_a_missing_hdf5plugin_is_one_clear_line(codec_runs, monkeypatch):
    from workbench.store import codecs

    monkeypatch.setitem(sys.modules, "hdf5plugin", None)  # import fails
    with pytest.raises(UserError, match=r"zstd; reading it needs the hdf5plugin package .*workbench\[export\]"):
        open_run(codec_runs["zstd"])
    with pytest.raises(UserError, match="hdf5plugin"):
        codecs.check("blosc2-zstd")
    codecs.check("gzip")
    with pytest.raises(UserError, match="unknown compression"):
        codecs.check("brotli")


def test_capture_cli_offers_the_codecs():
    r = run_cli("capture", "--help")
    assert "blosc2-zstd" in r.stdout and "zstd" in r.stdout
