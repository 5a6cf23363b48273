"""Activations for dictionary training, streamed from a run: which positions to use, contiguous
blocks of prompts read in a shuffled order, and a shuffling buffer, so memory stays at the buffer
whatever the run's size.

Positions that poison dictionaries are left out (``skip=auto``): a decoder's first position (BOS,
or the attention sink whose residual norm is ~100x the rest on SmolLM2, which would own the
dictionary's loss), special tokens anywhere, and rows whose norm is :data:`OUTLIER_RATIO` times the
median (a sink that is not at position 0). ``Selection.sink_ratio`` measures the first position's
median norm against the others' on the same sample of prompts, so the result says how big the
skipped sink was.

Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from workbench.errors import UserError

if TYPE_CHECKING:
    from workbench.store.reader import Run

SKIP_CHOICES = ("auto", "first", "special", "none")
OUTLIER_RATIO = 3.0
"""``skip=auto`` leaves out rows whose norm is this many times the median. On SmolLM2's layer-15
residual stream without a BOS, about 1% of second positions are sinks too (norm 500 to 5,000
against a median of 170) while 99.99% of the other rows stay under 1.4x the median."""


@dataclass
class Selection:
    """Which prompts train and which are held out, and which of their positions are used."""

    hook: str
    d_in: int
    train: list[int]
    heldout: list[int]
    skip_first: bool
    skip_special: bool
    lengths: np.ndarray
    """Rows of each prompt (indexed by prompt)."""
    special_at: dict[int, np.ndarray] = field(default_factory=dict)
    """Positions of special tokens, for the prompts that have any (when they are skipped)."""
    stream: str = "main"
    sink_ratio: float | None = None
    """Median norm of the first position over the median of the others, on the sample
    :func:`select` measured (None where prompts have no second position)."""
    max_norm: float | None = None
    """Rows with a larger norm are left out too (``skip=auto``: :data:`OUTLIER_RATIO` times the
    median norm of the rows after the first position): a sink that is not at position 0."""

    def keep(self, run: Run, i: int) -> np.ndarray:
        """Prompt ``i``'s positions to use (a boolean mask over its rows)."""
        mask = np.ones(int(self.lengths[i]), dtype=bool)
        if self.skip_first and len(mask):
            mask[0] = False
        at = self.special_at.get(i)
        if at is not None:
            mask[at] = False
        return mask

    def n_tokens(self, run: Run, prompts: list[int]) -> int:
        n = int(self.lengths[prompts].sum()) if prompts else 0
        if self.skip_first:
            n -= int((self.lengths[prompts] > 0).sum()) if prompts else 0
        for i in prompts:
            at = self.special_at.get(i)
            if at is not None:
                n -= int(len(at) - (1 if self.skip_first and 0 in at else 0))
        return n


def select(run: Run, hook: str, prompts: range, holdout: float, skip: str, seed: int) -> Selection:
    """Check ``hook`` can train a dictionary and split ``prompts`` into training and held out."""
    if not hook:
        raise UserError("name the hook to train on: --param sae.hook=NAME (e.g. blocks.12.hook_resid_post; "
                        f"this run stores {', '.join(n for n in run.hook_names if run.resolve(n).layout == 'token')[:200]})")
    try:
        spec = run.resolve(hook)
    except (KeyError, UserError):
        raise UserError(f"{run.final_path.name} has no hook {hook!r}") from None
    if spec.layout != "token" or len(spec.feature_shape) != 1:
        raise UserError(f"{hook} is stored as {spec.layout} rows of shape {tuple(spec.feature_shape)}; a "
                        "dictionary trains on one vector per token (a residual stream, an MLP or "
                        "attention output)")
    if skip not in SKIP_CHOICES:
        raise UserError(f"skip is one of {', '.join(SKIP_CHOICES)}, not {skip!r}")
    n = len(prompts)
    if n < 2 and holdout > 0:
        raise UserError("a held-out share needs at least 2 prompts (or set holdout=0)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_held = 0 if holdout <= 0 else max(1, min(n - 1, round(holdout * n)))
    heldout = sorted(int(prompts[j]) for j in order[:n_held])
    held = set(heldout)
    train = [int(i) for i in prompts if i not in held]
    stream = spec.stream_of_rows()
    table = run.token_table
    special = sorted(table.special) if table is not None else []
    decoder = run.family == "decoder"
    skip_special = skip in ("special", "auto")
    lengths = np.zeros(max(prompts, default=-1) + 1, dtype=np.int64)
    special_at: dict[int, np.ndarray] = {}
    for i in prompts:
        lengths[i] = run.n_tokens(int(i), stream)
        if skip_special and special:
            at = np.flatnonzero(np.isin(run.tokens(int(i), stream)[: lengths[i]], special))
            if len(at):
                special_at[int(i)] = at
    sel = Selection(hook=spec.name, d_in=int(spec.feature_shape[0]), train=train, heldout=heldout,
                    skip_first=skip in ("first",) or (skip == "auto" and decoder),
                    skip_special=skip_special, lengths=lengths, special_at=special_at, stream=stream)
    # One sample of up to 64 prompts, spread over the run, measures both the first position
    # against the rest (``sink_ratio``) and, for ``auto``, the norm beyond which rows are left out.
    norms = [np.linalg.norm(run.activation(sel.hook, int(i)).astype(np.float64), axis=-1)
             for i in list(prompts)[:: max(1, len(prompts) // 64)][:64]]
    firsts = [n[0] for n in norms if len(n) > 1]
    rest = np.concatenate([n[1:] for n in norms]) if norms else np.zeros(0)
    median = float(np.median(rest)) if len(rest) else 0.0
    if median > 0:
        sel.sink_ratio = float(np.median(firsts)) / median if firsts else None
        if skip == "auto":
            sel.max_norm = OUTLIER_RATIO * median
    return sel


def blocks(sel: Selection, prompts: list[int], block_tokens: int) -> list[list[int]]:
    """Runs of consecutive prompts (consecutive in the run, so each run is one read) of about
    ``block_tokens`` rows each."""
    out: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for i in prompts:
        if cur and (i != cur[-1] + 1 or size >= block_tokens):
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += int(sel.lengths[i])
    if cur:
        out.append(cur)
    return out


def read_block_where(run: Run, sel: Selection, block: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The used rows of consecutive prompts ``block`` (float32, in one read) and each one's
    prompt and position."""
    rows = run.rows(sel.hook, block[0], block[-1] + 1)
    mask = np.concatenate([sel.keep(run, i) for i in block]) if block else np.zeros(0, bool)
    if sel.max_norm is not None:
        mask &= np.linalg.norm(rows, axis=-1) <= sel.max_norm
    prompt = np.repeat(np.asarray(block), sel.lengths[block])
    pos = np.concatenate([np.arange(sel.lengths[i]) for i in block]) if block else np.zeros(0, int)
    return np.asarray(rows[mask], dtype=np.float32), prompt[mask], pos[mask]


def read_block(run: Run, sel: Selection, block: list[int]) -> np.ndarray:
    """The used rows of consecutive prompts ``block``, float32, in one read."""
    return read_block_where(run, sel, block)[0]


def row_stream(run: Run, sel: Selection, prompts: list[int], rng: np.random.Generator,
               block_tokens: int) -> Iterator[np.ndarray]:
    """Blocks of used rows, the blocks in a new random order each pass, forever."""
    bl = blocks(sel, prompts, block_tokens)
    if not bl:
        raise UserError("no prompts to train on")
    while True:
        for j in rng.permutation(len(bl)):
            rows = read_block(run, sel, bl[int(j)])
            if len(rows):
                yield rows


def shuffled_batches(source: Iterator[np.ndarray], d_in: int, buffer: int, batch: int,
                     rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Batches of ``batch`` rows drawn from a buffer of ``buffer`` rows: fill it, shuffle it, hand
    out its first half, move the second half to the front, refill (as SAELens' activation store
    does). Rows from one block are spread over many batches; memory is the buffer."""
    if buffer < 2 * batch:
        raise UserError(f"the buffer ({buffer:,} tokens) must hold at least two batches ({batch:,} tokens each)")
    buf = np.empty((buffer, d_in), dtype=np.float32)
    n = 0
    spare = np.empty((0, d_in), dtype=np.float32)
    half = buffer // 2
    while True:
        while n < buffer:
            chunk = spare if len(spare) else next(source)
            take = min(len(chunk), buffer - n)
            buf[n:n + take] = chunk[:take]
            spare = chunk[take:]
            n += take
        rng.shuffle(buf)  # rows, in place (a permuted copy would double the buffer)
        for s in range(0, half - batch + 1, batch):
            yield buf[s:s + batch].copy()
        used = (half // batch) * batch
        buf[:buffer - used] = buf[used:]
        n = buffer - used
