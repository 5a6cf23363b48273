"""What would checksumming a run's activations cost? HDF5's Fletcher-32 filter against the write
path captures use today, on activation-shaped data.

HDF5 (``libver="latest"``) checksums its metadata but not raw values: a flipped bit in an
activation reads back as a different number. The ``fletcher32`` filter checksums each chunk, and
a read of a damaged chunk fails. Captures write activations with ``write_direct_chunk`` (whole
chunks, no filter pipeline; see ``workbench/store/chunks.py``), which a checksum would replace by
the filter pipeline (or a hand-computed Fletcher-32 per chunk). Three ways of writing the same
rows, in 4 MB chunks as the writer makes them, then reading them back:

- ``direct``: ``write_direct_chunk``, what captures do;
- ``pipeline``: ``ds[a:b] = rows`` through the filter pipeline, no filter;
- ``fletcher32``: the same with the Fletcher-32 filter.

Writes end with flush and fsync; reads read every row (page cache warm, as a second look at a run
is; the faster of two reads). Modes alternate within each round; the table shows medians and each mode's ratio to
``direct``. The last check flips one byte of a checksummed chunk and requires the read to fail.

    .venv/bin/python benchmarks/checksum_bench.py --mb 256 --repeats 3 [--write BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

D_MODEL = 576  # SmolLM2-135M's residual stream
CHUNK_BYTES = 4 << 20  # the writer's largest chunk (workbench/store/writer.py CHUNK_BYTES_MAX)


def write(path: Path, data: np.ndarray, mode: str) -> float:
    rows = CHUNK_BYTES // (data.shape[1] * data.itemsize)
    t0 = time.perf_counter()
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.create_dataset("acts", shape=data.shape, dtype=data.dtype, chunks=(rows, data.shape[1]),
                              fletcher32=(mode == "fletcher32"))
        for a in range(0, len(data), rows):
            block = data[a : a + rows]
            if mode == "direct" and len(block) == rows:
                ds.id.write_direct_chunk((a, 0), block.tobytes())
            else:
                ds[a : a + len(block)] = block
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    return time.perf_counter() - t0


def read(path: Path) -> float:
    """Seconds to read every row, the faster of two reads (the file is in the page cache)."""
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        with h5py.File(path, "r") as f:
            ds = f["acts"]
            out = np.empty(ds.shape, ds.dtype)
            ds.read_direct(out)
        best = min(best, time.perf_counter() - t0)
    return best


def detects_a_flipped_byte(path: Path) -> bool:
    with h5py.File(path, "r") as f:
        offset = f["acts"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 1000)
        b = fh.read(1)
        fh.seek(offset + 1000)
        fh.write(bytes([b[0] ^ 1]))
    try:
        with h5py.File(path, "r") as f:
            f["acts"][:10]
    except OSError:
        return True
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=256, help="megabytes of float32 activations")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--write", default=None, help="update this BENCHMARKS.md section")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    data = rng.standard_normal((args.mb * (1 << 20) // (D_MODEL * 4), D_MODEL), dtype=np.float32)
    modes = ["direct", "pipeline", "fletcher32"]
    times: dict[str, dict[str, list[float]]] = {m: {"write": [], "read": []} for m in modes}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for r in range(args.repeats):
            for m in (modes if r % 2 == 0 else modes[::-1]):
                path = Path(tmp) / f"{m}.h5"
                times[m]["write"].append(write(path, data, m))
                times[m]["read"].append(read(path))
                print(f"round {r + 1} {m:10s} write {times[m]['write'][-1]:.3f} s  read {times[m]['read'][-1]:.3f} s",
                      file=sys.stderr)
        detected = detects_a_flipped_byte(Path(tmp) / "fletcher32.h5")
        undetected = not detects_a_flipped_byte(Path(tmp) / "direct.h5")
    med = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
    lines = [
        f"{args.mb} MB of float32 rows of {D_MODEL} (SmolLM2's residual stream), 4 MB chunks, "
        f"medians of {args.repeats} alternating rounds; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, h5py {h5py.__version__}, HDF5 {h5py.version.hdf5_version}.",
        "",
        "| write path | write (flush + fsync) | vs direct | read all rows | vs direct |",
        "|---|---|---|---|---|",
    ]
    for m in modes:
        lines.append(f"| {m} | {med[m]['write']:.3f} s | {med[m]['write'] / med['direct']['write']:.2f}x "
                     f"| {med[m]['read']:.3f} s | {med[m]['read'] / med['direct']['read']:.2f}x |")
    lines += ["", f"One flipped byte in a chunk: detected with fletcher32: {detected}; "
                  f"read back silently without it: {undetected}."]
    text = "\n".join(lines)
    print(text)
    if args.write:
        from sections import replace_section

        replace_section(Path(args.write), "## Checksums of raw values: what Fletcher-32 would cost "
                        "(`benchmarks/checksum_bench.py`)\n\n" + text)


if __name__ == "__main__":
    main()
