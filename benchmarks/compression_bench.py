"""How well do real activations compress, and at what cost? Every capture codec
(``--compression``: none, gzip, lzf, blosc2-zstd, zstd) on SmolLM2-135M's residual stream and
attention patterns, stored as float32, bfloat16 and float16.

SmolLM2 captures the project's own documentation (README and docs/, one paragraph a prompt, at
most 160 words) with the presets ``residual`` and ``attention``, once per storage dtype,
uncompressed. Then, for each codec, every activation dataset of the run is written to a fresh
HDF5 file with the codec's filters exactly as captures set them (``workbench/store/codecs.py``)
and the chunk shape the capture chose, in 64 MB blocks, ending with flush and fsync ("write");
then read back whole, the faster of two reads, page cache warm ("read"), and compared with the
original bit for bit. "ratio" is the values' bytes over the bytes HDF5 stored. All in one
process, one round; the load average before and after is reported, since other people share the
machine.

    .venv/bin/python benchmarks/compression_bench.py [--prompts 24] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent

CODECS = ("none", "gzip", "lzf", "blosc2-zstd", "zstd")
DTYPES = ("float32", "bfloat16", "float16")
BLOCK_BYTES = 64 << 20


def doc_prompts(n: int, max_words: int = 160, min_words: int = 60) -> list[str]:
    """Paragraphs of the project's own prose (README, docs/): real text, no download."""
    out: list[str] = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for para in re.split(r"\n\s*\n", path.read_text()):
            words = para.split()
            if len(words) >= min_words and not para.lstrip().startswith(("|", "```", "    ")):
                out.append(" ".join(words[:max_words]))
    if len(out) < n:
        raise SystemExit(f"only {len(out)} paragraphs of {min_words}+ words in the docs")
    return out[:n]


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write(path: Path, sources: dict[str, np.ndarray], chunks: dict[str, tuple[int, ...]],
          filters: dict) -> float:
    t0 = time.perf_counter()
    with h5py.File(path, "w", libver=("v110", "latest") if filters else "latest") as f:
        for name, data in sources.items():
            ds = f.create_dataset(name, shape=data.shape, dtype=data.dtype, chunks=chunks[name], **filters)
            row = max(1, data[:1].nbytes)
            step = max(chunks[name][0], BLOCK_BYTES // row // chunks[name][0] * chunks[name][0])
            for a in range(0, len(data), step):
                ds[a : a + step] = data[a : a + step]
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    return time.perf_counter() - t0


def read(path: Path, sources: dict[str, np.ndarray]) -> tuple[float, int]:
    """Seconds to read every dataset (the faster of two reads), and the bytes HDF5 stored."""
    best, stored = float("inf"), 0
    for _ in range(2):
        t0 = time.perf_counter()
        got = {}
        with h5py.File(path, "r") as f:
            for name in sources:
                ds = f[name]
                got[name] = np.empty(ds.shape, ds.dtype)
                ds.read_direct(got[name])
                stored += ds.id.get_storage_size() if _ == 0 else 0
        best = min(best, time.perf_counter() - t0)
    for name, data in sources.items():
        assert got[name].tobytes() == data.tobytes(), f"{name} did not read back bit for bit"
    return best, stored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--write", default=None, help="update this BENCHMARKS.md section")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import workbench
    from workbench.store import codecs

    torch.set_num_threads(os.cpu_count() or 1)
    load_before = loadavg()
    model = workbench.load_model("smollm2-135m", device="cpu", progress=False)
    prompts = doc_prompts(args.prompts)
    rows: list[str] = []
    totals: dict[tuple[str, str], tuple[int, int]] = {}
    n_tokens = 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for dtype in DTYPES:
            run_path = Path(tmp) / f"run-{dtype}.h5"
            workbench.capture(model, prompts, hooks=["residual", "attention"], out=run_path,
                              dtype=dtype, batch_size=4, progress=False)
            groups: dict[str, dict[str, np.ndarray]] = {"residual stream": {}, "attention patterns": {}}
            chunks: dict[str, tuple[int, ...]] = {}
            with h5py.File(run_path, "r") as f:
                n_tokens = int(f["prompts/token_offsets"][-1])
                for name, ds in f["acts"].items():
                    group = "attention patterns" if ds.attrs["layout"] == "square" else "residual stream"
                    groups[group][name] = ds[...]
                    chunks[name] = ds.chunks
            run_path.unlink()
            for group, sources in groups.items():
                raw = sum(a.nbytes for a in sources.values())
                for codec in CODECS:
                    path = Path(tmp) / f"{codec}.h5"
                    w = write(path, sources, chunks, codecs.filters(codec))
                    r, stored = read(path, sources)
                    path.unlink()
                    totals[(dtype, codec)] = tuple(map(sum, zip(totals.get((dtype, codec), (0, 0)), (raw, stored))))
                    rows.append(f"| {dtype} | {group} ({len(sources)}) | {raw / 1e6:,.0f} | {codec} | {w:.2f} | {raw / 1e6 / w:,.0f} "
                                f"| {r:.2f} | {raw / 1e6 / r:,.0f} | {raw / stored:.3f} |")
                    print(rows[-1], file=sys.stderr)
    load_after = loadavg()
    import hdf5plugin

    lines = [
        f"SmolLM2-135M (Q4_1 GGUF weights, computed in float32) on {len(prompts)} paragraphs of the "
        f"project's docs ({n_tokens:,} tokens), presets `residual` (rows of 576) and "
        f"`attention` (30 layers x 9 heads; tensors per group in brackets); {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores shared with other users, h5py {h5py.__version__}, HDF5 "
        f"{h5py.version.hdf5_version}, hdf5plugin {hdf5plugin.version}. One round; load average "
        f"(1, 5, 15 min) {load_before} before, {load_after} after. Write: flush + fsync included; "
        "read: page cache warm, faster of two; every codec read back bit for bit.",
        "",
        "| storage | tensors | MB | codec | write s | write MB/s | read s | read MB/s | ratio |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Whole run (both groups), ratio by codec: "
        + "; ".join(f"{dtype}: " + ", ".join(f"{c} {totals[(dtype, c)][0] / totals[(dtype, c)][1]:.2f}"
                                           for c in CODECS) for dtype in DTYPES) + ".",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        from sections import replace_section

        replace_section(Path(args.write), "## Compression of activations (`benchmarks/compression_bench.py`)\n\n"
                        + text)


if __name__ == "__main__":
    main()
