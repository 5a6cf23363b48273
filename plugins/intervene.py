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
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from typing import TypeAlias

    import torch

    from workbench.models.model import Model

    # What an edit writes: fixed values (first axis: position), or a function of the activation the
    # row has at the hook (``(positions, ...)``) giving them (see :meth:`Intervener.run`).
    Source: TypeAlias = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]

TOKEN_BUDGET = 8192
"""Rows x positions run in one batch (bounds the activations held at once)."""
LOGIT_BUDGET = 2048
"""Rows x read positions whose full-vocabulary logits are held at once."""


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

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits``: (rows, len(positions), vocab) -> (rows,) float64."""
        import torch

        x = logits.to(torch.float64)
        if self.kind == "loss":
            nxt = torch.as_tensor(self.tokens[1:], device=x.device)
            logp = torch.log_softmax(x, dim=-1)
            return -logp.gather(-1, nxt.expand(x.shape[0], -1)[..., None])[..., 0].mean(-1)
        last = x[:, -1]
        if self.kind == "logit":
            return last[:, self.target]
        if self.kind == "logit_diff":
            return last[:, self.target] - last[:, self.wrong]
        return torch.softmax(last, dim=-1)[:, self.target]


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
        self.shared_prefix = False
        self.fallback_reason = "not requested"
        if share_prefix:
            self._check_replay()

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

    def _check_replay(self) -> None:
        import torch

        if len(self._inputs) != self.n_layers or not all(
                isinstance(a[0], torch.Tensor) and a[0].shape[:2] == (1, self.n) for a, _ in self._inputs.values()):
            self.fallback_reason = "the blocks' inputs could not be captured"
            return
        pos = self.metric.positions
        with torch.inference_mode():
            try:
                replayed = self._replay(0, self._inputs[0][0][0].clone(), pos)
            except Exception as exc:  # noqa: BLE001 (any failure: fall back to full forward passes)
                self.fallback_reason = f"replaying the blocks failed ({type(exc).__name__}: {exc})"
                return
        full = self.base_logits[:, pos]
        err = float((replayed - full).abs().max())
        tol = 1e-4 * max(1.0, float(full.abs().max()))
        if replayed.shape != full.shape or not err <= tol:
            self.fallback_reason = f"replaying the blocks does not reproduce the model's logits (max error {err:.2g})"
            return
        self.shared_prefix = True
        self.fallback_reason = ""

    def _replay(self, start: int, x: torch.Tensor | None, positions: list[int],
                joining: Sequence[int] = ()) -> torch.Tensor:
        """Blocks ``start ..`` on residual ``x`` (rows, n, d_model), then the final norm and
        unembedding at ``positions``. Before block ``i``, one row per ``joining`` entry equal to
        ``i`` joins the batch, holding the clean residual stream entering block ``i``."""
        import torch

        counts = np.bincount(np.asarray(joining, dtype=np.int64), minlength=self.n_layers) if len(joining) else None
        for i in range(start, self.n_layers):
            args, kwargs = self._inputs[i]
            if counts is not None and counts[i]:
                new = args[0].expand(int(counts[i]), -1, -1).clone()
                x = new if x is None else torch.cat([x, new])
            kw = dict(kwargs)
            if "past_key_values" in kw:
                kw["past_key_values"] = None
            if "use_cache" in kw:
                kw["use_cache"] = False
            out = self.bridge.blocks[i](x, *args[1:], **kw)
            x = out[0] if isinstance(out, tuple) else out
        assert x is not None, "no row joined the batch"
        return self.bridge.unembed(self.bridge.ln_final(x[:, positions]))

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

    def run(self, rows: Sequence[Row], source: Mapping[str, Source], *, batched: bool = True,
            progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """The metric with each row's edits applied, ``(len(rows),)`` float64. ``source[hook]``
        holds the values edits write (first axis: position), or is a function of the activation
        arriving at the hook in that row (``(positions, ...)``, with the row's earlier edits to the
        same hook applied) returning the values to write, same shape: an edit that depends on the
        live activation, such as removing one SAE feature's contribution. ``batched=False``: one
        full forward pass per row (the reference the batched engine is tested against)."""
        import torch

        out = np.full(len(rows), self.baseline, dtype=np.float64)  # a row without edits is the clean pass
        rows_in = [k for k, row in enumerate(rows) if row]
        if not batched:
            for done, k in enumerate(rows_in):
                out[k] = self._batch([rows[k]], source, starts=None)[0]
                if progress:
                    progress(done + 1, len(rows_in))
            return out
        first = {k: min(e.layer for e in rows[k]) if self.shared_prefix else 0 for k in rows_in}
        order = sorted(rows_in, key=lambda k: first[k])
        per_batch = max(1, min(TOKEN_BUDGET // self.n, LOGIT_BUDGET // len(self.metric.positions)))
        with torch.inference_mode():
            for s in range(0, len(order), per_batch):
                chunk = order[s : s + per_batch]
                out[chunk] = self._batch([rows[k] for k in chunk], source,
                                         starts=[first[k] for k in chunk] if self.shared_prefix else None)
                if progress:
                    progress(min(s + per_batch, len(order)), len(order))
        return out

    def _batch(self, rows: Sequence[Row], source: Mapping[str, Source],
               starts: Sequence[int] | None) -> np.ndarray:
        """The metric for ``rows``: a full forward pass of the batch (``starts`` None), or a replay
        in which row ``r`` joins the batch at block ``starts[r]`` (ascending) with the clean
        residual stream entering that block: one pass over the blocks whose batch grows."""
        import torch

        by_hook: dict[str, list[tuple[int, Edit]]] = defaultdict(list)
        for r, row in enumerate(rows):
            for e in row:
                by_hook[e.hook].append((r, e))

        def make(edits: list[tuple[int, Edit]]) -> Callable[..., Any]:
            def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
                for r, e in edits:
                    idx: tuple[Any, ...] = (slice(None) if e.pos is None else e.pos,)
                    if e.head is not None:
                        idx += (e.head,)
                    src = source[e.hook]
                    value = src(act[r]) if callable(src) else src
                    act[(r, *idx)] = value[idx].to(act.dtype)
                return act
            return fn

        fwd = [(h, make(edits)) for h, edits in by_hook.items()]
        pos = self.metric.positions
        with torch.inference_mode(), self.bridge.hooks(fwd_hooks=fwd):
            if starts is None:
                logits = self.bridge(self.tokens.expand(len(rows), -1))[:, pos]
            else:
                logits = self._replay(starts[0], None, pos, joining=starts)
        return self.metric(logits).cpu().numpy()

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
