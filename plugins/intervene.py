"""The intervention engine behind ``ablation``, ``patching`` and ``steering``: run a decoder on one
prompt many times, each row of a batch with its own edits to named activations, and read one
metric per row.

An :class:`Edit` overwrites one hook's activation (at one position or all, for one head or all)
with the value a *source* holds for it: zeros, a mean over reference prompts, another prompt's
activations (resample ablation, activation patching), or a function of the row's own activation
there (an SAE feature's contribution removed, clamped or added: ``feature-intervention``). A row is
a tuple of edits applied together.

Speed: rows run as batches, and rows whose first edit is in block ``L`` share the unchanged prefix
of the forward pass: the clean residual stream entering block ``L`` is computed once, and only
blocks ``L ..`` run for them (TransformerBridge's own ``start_at_layer`` still runs blocks
``0 .. L-1`` internally, so the engine calls the blocks itself, with the arguments the model
passed them on the clean pass). Before relying on that, the engine replays the clean pass from
block 0 and compares it with the model's own logits; a model whose blocks cannot be replayed
(anything the model does after the last block besides the final norm and unembedding) falls back
to full forward passes, still batched. ``Intervener.shared_prefix`` says which it used.

Attention is causal, so a row whose edits leave every position before ``q`` as it was (what an
edit writes there equals the clean pass's activation, bit for bit) runs positions ``q ..`` only:
each block's attention gets the clean pass's keys and values of the earlier positions in the
place of the model's key-value cache (:class:`_KVPrefix`, through the bridge's cache path that
``workbench.models.kv_cache`` fixes). A row that writes only what is already there is the clean
pass. This is checked like the replay, from two start positions, and off where it does not hold
(``Intervener.shared_positions``, ``positions_reason``). A ``logit`` or ``logit_diff`` metric
takes its logits from those rows of the unembedding only (checked the same way).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.models import kv_cache

if TYPE_CHECKING:
    from typing import TypeAlias

    import torch

    from workbench.models.model import Model

    # What an edit writes: fixed values (first axis: position), or a function of the activation the
    # row has at the hook (``(positions, ...)``) giving them (see :meth:`Intervener.run`).
    Source: TypeAlias = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

TOKEN_BUDGET = 2048
"""Rows x positions run in one batch (bounds the activations held at once)."""
LOGIT_BUDGET = 2048
"""Rows x read positions whose full-vocabulary logits are held at once."""
PASS_OVERHEAD_TOKENS = 48
"""What one more call of a block costs, in tokens through it (SmolLM2 on 2 cores: about 3 ms of
Python and small operations against 62 us per token): rows whose first change is a few positions
later join a pass that starts earlier rather than run a pass of their own (speed only)."""


@dataclass(frozen=True)
class Edit:
    """Overwrite ``hook``'s activation at ``pos`` (all positions if None) and ``head`` (all if
    None; ``hook_z`` only) with the source's value there (a fixed tensor, or a function of the
    row's live activation at the hook)."""

    hook: str
    layer: int
    """The block the hook belongs to: rows first edited in block ``L`` start at block ``L``."""
    pos: int | None = None
    head: int | None = None


Row = tuple[Edit, ...]


def hook_names(layer: int) -> dict[str, str]:
    return {"z": f"blocks.{layer}.attn.hook_z", "attn": f"blocks.{layer}.hook_attn_out",
            "mlp": f"blocks.{layer}.hook_mlp_out", "resid": f"blocks.{layer}.hook_resid_pre"}


class Metric:
    """A number read off a row's logits: ``logit`` of ``target``, ``logit_diff`` (``target`` -
    ``wrong``), ``prob`` of ``target`` (softmax over the vocabulary), or ``loss`` (mean next-token
    cross-entropy over the prompt's tokens). Computed in float64."""

    def __init__(self, kind: str, tokens: Sequence[int], target: int | None = None, wrong: int | None = None):
        if kind in ("logit", "prob", "logit_diff") and target is None:
            raise ValueError(f"metric {kind} needs a target token")
        if kind == "logit_diff" and wrong is None:
            raise ValueError("metric logit_diff needs a wrong token")
        self.kind, self.tokens, self.target, self.wrong = kind, list(tokens), target, wrong

    @property
    def positions(self) -> list[int]:
        """Positions whose logits the metric reads."""
        n = len(self.tokens)
        return list(range(n - 1)) if self.kind == "loss" else [n - 1]

    @property
    def columns(self) -> list[int] | None:
        """The vocabulary entries whose logits the metric reads (None: it needs all of them)."""
        return [self.target] if self.kind == "logit" else [self.target, self.wrong] \
            if self.kind == "logit_diff" else None  # type: ignore[list-item]

    def __call__(self, logits: torch.Tensor, narrow: bool = False) -> torch.Tensor:
        """``logits``: (rows, len(positions), vocab) -> (rows,) float64. ``narrow``: the logits
        hold only the :attr:`columns`, in that order."""
        import torch

        x = logits.to(torch.float64)
        if self.kind == "loss":
            nxt = torch.as_tensor(self.tokens[1:], device=x.device)
            logp = torch.log_softmax(x, dim=-1)
            return -logp.gather(-1, nxt.expand(x.shape[0], -1)[..., None])[..., 0].mean(-1)
        last = x[:, -1]
        target, wrong = (0, 1) if narrow else (self.target, self.wrong)
        if self.kind == "logit":
            return last[:, target]
        if self.kind == "logit_diff":
            return last[:, target] - last[:, wrong]
        return torch.softmax(last, dim=-1)[:, self.target]


class _KVRecord:
    """In the place of the model's key-value cache on a replay of the clean pass: keeps each
    block's keys and values (position axis -2) and hands them back unchanged."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.calls = 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.kv[layer_idx] = (k.clone(), v.clone())
        self.calls += 1
        return k, v


class _KVPrefix:
    """In the place of the cache on a replay of positions ``q ..``: each block's attention sees
    the clean pass's keys and values of positions ``< q`` before every row's own."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], q: int):
        self.prefix = {i: (k[..., :q, :], v[..., :q, :]) for i, (k, v) in kv.items()}

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        pk, pv = self.prefix[layer_idx]
        rows = (k.shape[0], *pk.shape[1:])
        return torch.cat([pk.expand(rows), k], dim=-2), torch.cat([pv.expand(rows), v], dim=-2)


class Intervener:
    """Runs ``model`` on ``tokens`` (one prompt) with rows of edits; see the module's docstring."""

    def __init__(self, model: Model, tokens: Sequence[int], metric: Metric, *, share_prefix: bool = True,
                 keep: Sequence[str] = ()):
        """``keep``: hooks whose activations on this prompt the clean pass keeps in ``self.clean``."""
        import torch

        self.model = model
        self.bridge = model.bridge
        self.tokens = torch.as_tensor([list(tokens)], dtype=torch.long, device=model.device)
        self.n = len(tokens)
        self.metric = metric
        self.n_layers = len(self.bridge.blocks)
        self._inputs: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.base_logits, self.clean = self._clean_pass(keep)
        self.baseline = float(metric(self.base_logits[:, metric.positions]))
        self._base: dict[str, torch.Tensor] = dict(self.clean)
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._narrow: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.shared_prefix = False
        self.fallback_reason = "not requested"
        self.shared_positions = False
        self.positions_reason = "not requested"
        if share_prefix:
            self._check_replay()
            self._check_suffix()

    # --- the clean pass and its replay ---------------------------------------------------------

    def _clean_pass(self, keep: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass: the logits, the ``keep`` activations, and each block's arguments."""

        def grab(i: int) -> Callable[..., None]:
            def pre(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                self._inputs[i] = (args, kwargs)
            return pre

        handles = [blk.register_forward_pre_hook(grab(i), with_kwargs=True)
                   for i, blk in enumerate(self.bridge.blocks)]
        try:
            return self.cache(keep)
        finally:
            for h in handles:
                h.remove()

    def _close(self, logits: torch.Tensor, columns: list[int] | None = None) -> str:
        """Empty when ``logits`` (at the metric's positions; only ``columns`` if given) reproduce
        the model's own, else why not."""
        full = self.base_logits[:, self.metric.positions][..., slice(None) if columns is None else columns]
        if logits.shape != full.shape:
            return f"shape {tuple(logits.shape)} instead of {tuple(full.shape)}"
        err = float((logits - full).abs().max())
        return "" if err <= 1e-4 * max(1.0, float(full.abs().max())) else f"max error {err:.2g}"

    def _check_replay(self) -> None:
        import torch

        if len(self._inputs) != self.n_layers or not all(
                isinstance(a[0], torch.Tensor) and a[0].shape[:2] == (1, self.n) for a, _ in self._inputs.values()):
            self.fallback_reason = "the blocks' inputs could not be captured"
            return
        with torch.inference_mode():
            try:
                normed = self._replay(0, self._inputs[0][0][0].clone(), self.metric.positions)
            except Exception as exc:  # noqa: BLE001 (any failure: fall back to full forward passes)
                self.fallback_reason = f"replaying the blocks failed ({type(exc).__name__}: {exc})"
                return
            why = self._close(self.bridge.unembed(normed))
            if why:
                self.fallback_reason = f"replaying the blocks does not reproduce the model's logits ({why})"
                return
            self.shared_prefix = True
            self.fallback_reason = ""
            # A metric that reads a few logits takes them from those rows of the unembedding
            # (of SmolLM2's 49,152: 8% of ablation's time went to logits nobody read).
            lin, columns = getattr(self.bridge.unembed, "original_component", None), self.metric.columns
            if columns is not None and isinstance(lin, torch.nn.Linear):
                self._narrow = (lin.weight[columns], None if lin.bias is None else lin.bias[columns])
                if self._close(self._logits(normed, narrow=True), columns):
                    self._narrow = None

    def _logits(self, normed: torch.Tensor, narrow: bool) -> torch.Tensor:
        """The unembedding of the final norm's output: every logit, or (``narrow``) the metric's
        :attr:`Metric.columns` only."""
        from torch.nn.functional import linear

        return linear(normed, *self._narrow) if narrow else self.bridge.unembed(normed)  # type: ignore[misc]

    def _check_suffix(self) -> None:
        """Whether rows can start at a later position, on the clean pass's keys and values of the
        positions before it: the clean pass replayed once keeping each block's keys and values,
        then from a middle position and from the first read position, each compared with the
        model's logits."""
        import torch

        lo = min(self.metric.positions)
        if not self.shared_prefix or lo == 0:
            self.positions_reason = "the blocks are not replayed" if not self.shared_prefix else \
                "the metric reads the first position"
            return
        record = _KVRecord()
        x0 = self._inputs[0][0][0]
        try:
            with torch.inference_mode(), kv_cache.passing():
                why = self._close(self.bridge.unembed(self._replay(0, x0.clone(), self.metric.positions, cache=record)))
                if sorted(record.kv) != list(range(self.n_layers)) or record.calls != self.n_layers or any(
                        k.shape[0] != 1 or k.shape[-2] != self.n for k, _ in record.kv.values()):
                    why = why or "the blocks' attention did not hand over its keys and values once each"
                self._kv = record.kv
                for q in sorted({max(1, lo // 2), lo}):
                    why = why or self._close(self.bridge.unembed(
                        self._replay(0, x0[:, q:].clone(), self.metric.positions, q=q)))
        except Exception as exc:  # noqa: BLE001 (any failure: rows start at position 0)
            why = f"{type(exc).__name__}: {exc}"
        if why:
            self._kv = {}
            self.positions_reason = f"replaying later positions alone does not reproduce the model ({why})"
            return
        self.shared_positions = True
        self.positions_reason = ""

    def _block_args(self, i: int, q: int, cache: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Block ``i``'s arguments after the residual stream as the clean pass gave them: without
        a cache (``cache`` None), or with ``cache`` in its place and positions ``q ..`` only."""
        from transformers.cache_utils import Cache

        args, kwargs = self._inputs[i]
        if cache is None:
            kw = dict(kwargs)
            if "past_key_values" in kw:
                kw["past_key_values"] = None
            if "use_cache" in kw:
                kw["use_cache"] = False
            return args[1:], kw

        def cut(v: Any) -> Any:
            if isinstance(v, Cache):
                return cache
            if isinstance(v, (tuple, list)):
                return type(v)(cut(u) for u in v)
            if not hasattr(v, "shape") or self.n not in v.shape:
                return v
            if v.ndim == 4 and tuple(v.shape[-2:]) == (self.n, self.n):  # a mask: rows are queries
                return v[..., q:, :]
            if v.ndim >= 2 and v.shape[1] == self.n:  # position ids, rotary cos and sin
                return v[:, q:]
            if v.ndim == 1:  # cache positions
                return v[q:]
            raise ValueError(f"block {i}: an argument of shape {tuple(v.shape)} has a position axis the "
                             f"engine does not know")

        rest = tuple(cut(a) for a in args[1:])
        kw = {k: v if k == "attention_mask" and getattr(v, "ndim", 4) != 4 else cut(v) for k, v in kwargs.items()}
        if "use_cache" in kw:
            kw["use_cache"] = False
        if not any(isinstance(v, Cache) for v in (*args, *kwargs.values())):
            kw["past_key_values"] = cache
        return rest, kw

    def _replay(self, start: int, x: torch.Tensor | None, positions: list[int],
                joining: Sequence[int] = (), q: int = 0, cache: Any = None) -> torch.Tensor:
        """Blocks ``start ..`` on residual ``x`` (rows, n - q, d_model), then the final norm at
        ``positions`` (:meth:`_logits` unembeds it). Before block ``i``, one row per ``joining``
        entry equal to ``i`` joins the batch, holding the clean residual stream entering block
        ``i``. ``q`` > 0: positions ``q ..`` only, attending to the clean keys and values before."""
        import torch

        if q:
            cache = _KVPrefix(self._kv, q)
        counts = np.bincount(np.asarray(joining, dtype=np.int64), minlength=self.n_layers) if len(joining) else None
        with kv_cache.passing() if cache is not None else nullcontext():
            for i in range(start, self.n_layers):
                if counts is not None and counts[i]:
                    new = self._inputs[i][0][0][:, q:].expand(int(counts[i]), -1, -1).clone()
                    x = new if x is None else torch.cat([x, new])
                rest, kw = self._block_args(i, q, cache)
                out = self.bridge.blocks[i](x, *rest, **kw)
                x = out[0] if isinstance(out, tuple) else out
        assert x is not None, "no row joined the batch"
        return self.bridge.ln_final(x[:, [p - q for p in positions]])  # type: ignore[no-any-return]

    # --- activations -----------------------------------------------------------------------------

    def activations(self, hooks: Sequence[str], tokens: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Each hook's activation (first axis: position) on ``tokens`` (default: this prompt)."""
        return self.cache(hooks, tokens)[1]

    def cache(self, hooks: Sequence[str], tokens: Sequence[int] | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The logits and each hook's activation (first axis: position) on ``tokens`` (default:
        this prompt), from one forward pass."""
        import torch

        toks = self.tokens if tokens is None else torch.as_tensor([list(tokens)], dtype=torch.long,
                                                                     device=self.model.device)
        wanted = set(hooks)
        with torch.inference_mode():
            logits, cache = self.bridge.run_with_cache(toks, names_filter=lambda n: n in wanted)
        return logits, {h: cache[h][0].clone() for h in hooks}

    # --- rows ------------------------------------------------------------------------------------

    def first_changes(self, rows: Sequence[Row], source: Mapping[str, Source]) -> list[int]:
        """Per row, the first position its edits change: the first position an edit writes a value
        that differs, bit for bit, from the clean pass's activation there (0 for an edit whose
        source is a function, ``n`` for a row that writes only what is already there)."""
        import torch

        fixed = {e.hook for row in rows for e in row if not callable(source[e.hook])}
        missing = sorted(fixed - self._base.keys())
        if missing:
            self._base.update(self.activations(missing))
        differs: dict[tuple[str, int | None], np.ndarray | None] = {}

        def changed(e: Edit) -> np.ndarray | None:
            key = (e.hook, e.head)
            if key not in differs:
                src, base = source[e.hook], self._base.get(e.hook)
                differs[key] = None
                if not callable(src) and base is not None and base.shape[0] == self.n and src.shape == base.shape:
                    s, b = (src, base) if e.head is None else (src[:, e.head], base[:, e.head])
                    differs[key] = (s.to(b.dtype) != b).reshape(self.n, -1).any(1).cpu().numpy()
            return differs[key]

        out = []
        with torch.inference_mode():
            for row in rows:
                first = self.n
                for e in row:
                    d = changed(e)
                    if d is None:
                        first = 0
                        break
                    hits = np.flatnonzero(d) if e.pos is None else [e.pos] if d[e.pos] else []
                    first = min(first, int(hits[0]) if len(hits) else self.n)
                out.append(first)
        return out

    def run(self, rows: Sequence[Row], source: Mapping[str, Source], *, batched: bool = True,
            progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """The metric with each row's edits applied, ``(len(rows),)`` float64. ``source[hook]``
        holds the values edits write (first axis: position), or is a function of the activation
        arriving at the hook in that row (``(positions, ...)``, with the row's earlier edits to the
        same hook applied) returning the values to write, same shape: an edit that depends on the
        live activation, such as removing one SAE feature's contribution. ``batched=False``: one
        full forward pass per row (the reference the batched engine is tested against).

        Batched, a row that writes only the values already there (:meth:`first_changes`) is the
        clean pass, and, where :attr:`shared_positions`, a row whose first change is at position
        ``q`` runs positions ``q ..`` only (the positions before it are the clean pass's)."""
        import torch

        out = np.full(len(rows), self.baseline, dtype=np.float64)  # a row without edits is the clean pass
        rows_in = [k for k, row in enumerate(rows) if row]
        if not batched:
            for done, k in enumerate(rows_in):
                out[k] = self._batch([rows[k]], source, starts=None)[0]
                if progress:
                    progress(done + 1, len(rows_in))
            return out
        firsts = self.first_changes([rows[k] for k in rows_in], source)
        lo = min(self.metric.positions) if self.shared_positions else 0
        qs = {k: min(f, lo) for k, f in zip(rows_in, firsts, strict=True) if f < self.n}
        first = {k: min(e.layer for e in rows[k]) if self.shared_prefix else 0 for k in qs}
        done = len(rows_in) - len(qs)
        with torch.inference_mode():
            for q, members in self._passes(qs, first):
                per_batch = max(1, min(TOKEN_BUDGET // (self.n - q), LOGIT_BUDGET // len(self.metric.positions)))
                for s in range(0, len(members), per_batch):
                    chunk = members[s : s + per_batch]
                    out[chunk] = self._batch([rows[k] for k in chunk], source, q=q,
                                             starts=[first[k] for k in chunk] if self.shared_prefix else None)
                    done += len(chunk)
                    if progress:
                        progress(done, len(rows_in))
        return out

    def _passes(self, qs: dict[int, int], first: dict[int, int]) -> list[tuple[int, list[int]]]:
        """Rows (by index) grouped into passes that start at position ``q``, each sorted by the
        block rows join at. Rows of a later start position join an earlier pass when computing
        the extra positions costs less than the block calls of a pass of their own."""
        groups: dict[int, list[int]] = defaultdict(list)
        for k in qs:
            groups[qs[k]].append(k)
        passes: list[tuple[int, list[int]]] = []
        for q in sorted(groups):
            members = groups[q]
            if passes:
                work = sum(self.n_layers - first[k] for k in members)  # rows x blocks they run
                calls = self.n_layers - min(first[k] for k in members)
                if work * (q - passes[-1][0]) < calls * PASS_OVERHEAD_TOKENS:
                    passes[-1][1].extend(members)
                    continue
            passes.append((q, list(members)))
        return [(q, sorted(members, key=lambda k: first[k])) for q, members in passes]

    def _batch(self, rows: Sequence[Row], source: Mapping[str, Source],
               starts: Sequence[int] | None, q: int = 0) -> np.ndarray:
        """The metric for ``rows``: a full forward pass of the batch (``starts`` None), or a replay
        in which row ``r`` joins the batch at block ``starts[r]`` (ascending) with the clean
        residual stream entering that block: one pass over the blocks whose batch grows. ``q``:
        the replay covers positions ``q ..`` (edits before ``q`` write what is already there)."""
        import torch

        by_hook: dict[str, list[tuple[int, Edit]]] = defaultdict(list)
        for r, row in enumerate(rows):
            for e in row:
                if e.pos is None or e.pos >= q:
                    by_hook[e.hook].append((r, e))

        def make(edits: list[tuple[int, Edit]]) -> Callable[..., Any]:
            def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
                for r, e in edits:
                    at: tuple[Any, ...] = (slice(None),) if e.pos is None else (e.pos - q,)
                    src = source[e.hook]
                    if callable(src):  # q is 0: the function sees every position
                        value, take = src(act[r]), at
                    else:
                        value, take = src, (slice(q, None),) if e.pos is None else (e.pos,)
                    if e.head is not None:
                        at, take = (*at, e.head), (*take, e.head)
                    act[(r, *at)] = value[take].to(act.dtype)
                return act
            return fn

        fwd = [(h, make(edits)) for h, edits in by_hook.items()]
        pos = self.metric.positions
        # the narrow unembedding bypasses the unembedding's hooks: only for edits inside the blocks
        narrow = starts is not None and self._narrow is not None and all(h.startswith("blocks.") for h in by_hook)
        with torch.inference_mode(), self.bridge.hooks(fwd_hooks=fwd):
            if starts is None:
                logits = self.bridge(self.tokens.expand(len(rows), -1))[:, pos]
            else:
                logits = self._logits(self._replay(starts[0], None, pos, joining=starts, q=q), narrow)
        return self.metric(logits, narrow).cpu().numpy()

    # --- gradients (attribution patching) --------------------------------------------------------

    def gradients(self, hooks: Sequence[str]) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One forward and one backward pass on this prompt: the metric, and each hook's activation
        and the metric's gradient with respect to it (first axis: position)."""
        import torch

        acts: dict[str, torch.Tensor] = {}

        def keeper(name: str) -> Callable[..., torch.Tensor]:
            def keep(act: torch.Tensor, hook: Any) -> torch.Tensor:
                if not act.requires_grad:  # weights without gradients: track from here on
                    act = act.detach().requires_grad_(True)
                act.retain_grad()
                acts[name] = act
                return act
            return keep

        wanted = list(dict.fromkeys(hooks))
        with torch.enable_grad(), self.bridge.hooks(fwd_hooks=[(h, keeper(h)) for h in wanted]):
            logits = self.bridge(self.tokens)
            value = self.metric(logits[:, self.metric.positions])[0]
            value.backward()
        grads = {h: acts[h].grad[0].detach().clone() for h in wanted}  # type: ignore[index]
        self.bridge.zero_grad(set_to_none=True)
        return float(value.detach()), {h: acts[h][0].detach().clone() for h in wanted}, grads
