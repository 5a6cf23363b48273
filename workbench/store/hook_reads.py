"""The stored hooks of a run: what each holds and reading it (:class:`HookReads`, the part of
:class:`workbench.store.reader.Run` about activations).

A mixin, so that ``Run`` stays one class for its users while its source stays in two files: it
reads through the host's checked accessors (``_ds``, ``_read``, ``_check``, ``_token_range``,
``_offsets_of``, ``_json``, ``n_tokens``, ``str_tokens``, ``size_bytes``), which apply the damage
checks of :mod:`workbench.store.guard` to every offset and slice.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from workbench.errors import UserError
from workbench.store import guard
from workbench.store import schema as S


class HookReads:
    """Activations of the stored hooks; mixed into :class:`~workbench.store.reader.Run`."""

    path: Path
    _n: int
    _ds: Any
    _read: Any
    _check: Any
    _token_range: Any
    _offsets_of: Any
    _json: Any
    n_tokens: Any
    str_tokens: Any
    size_bytes: Any

    @cached_property
    def hooks(self) -> dict[str, S.HookSpec]:
        """Stored tensors by dataset name."""
        try:
            specs = [S.HookSpec.from_dict(d) for d in self._json(S.META_HOOKS, list)]
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise guard.damaged(self.path, f"{S.META_HOOKS}: {exc!r}") from None
        for spec in specs:
            guard.check_spec(self.path, spec)
        return {spec.name: spec for spec in specs}

    @cached_property
    def aliases(self) -> dict[str, str]:
        """Every hook name the run answers to -> the stored tensor's name."""
        out = {}
        for spec in self.hooks.values():
            out[spec.name] = spec.name
            for a in spec.aliases:
                out[a] = spec.name
        return out

    @property
    def hook_names(self) -> list[str]:
        """Every hook name :meth:`activation` accepts (stored names and their aliases)."""
        return sorted(self.aliases)

    def resolve(self, hook: str) -> S.HookSpec:
        name = self.aliases.get(hook)
        if name is None:
            import difflib

            close = difflib.get_close_matches(hook, self.hook_names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"hook {hook!r} was not captured in this run{hint}")
        return self.hooks[name]

    def axes(self, hook: str) -> tuple[str, ...]:
        """Names of the axes of :meth:`activation`'s result for ``hook``."""
        return self.resolve(hook).axes

    def activation(self, hook: str, i: int) -> np.ndarray:
        """The stored activation of ``hook`` for prompt ``i``, shaped like TransformerLens' cache
        entry without the batch dimension: ``(seq, d_model)``, ``(seq, heads, d_head)``,
        ``(heads, q, k)``, ... float32 for bfloat16 runs; float16 runs stay float16."""
        spec = self.resolve(hook)
        name = f"{S.ACTS}/{spec.name}"
        if spec.layout == "square":
            i = self._check(i)
            start, shape = self._square(spec, i)
            values = self._read(name, start, start + shape[0] * shape[1] * shape[2], "fiu").reshape(shape)
        else:
            start, end = self._token_range(i, spec.stream_of_rows())
            values = self._read(name, start, end, "fiu")
        return S.decode_values(values, self._encoding(name))

    def _square(self, spec: S.HookSpec, i: int) -> tuple[int, tuple[int, int, int]]:
        """Where prompt ``i``'s block of a square-layout hook starts, and its shape; a block whose
        length disagrees with its tokens is damage."""
        name = f"{S.ACTS_OFFSETS}/{spec.name}"
        start, end = guard.offsets(self.path, name, self._read(name, i, i + 2), 2,
                                   self._ds(f"{S.ACTS}/{spec.name}").shape[0])
        q, k = spec.square_streams()
        shape = (spec.feature_shape[0], self.n_tokens(i, q), self.n_tokens(i, k))
        if end - start != shape[0] * shape[1] * shape[2]:
            raise guard.damaged(self.path, f"{name}: prompt {i}'s block has {end - start:,} values, "
                                           f"not {shape[0]} x {shape[1]} x {shape[2]}")
        return int(start), shape

    def _encoding(self, name: str) -> str | None:
        """How a hook's values are stored (``bfloat16`` raw bits, or plain), checked, read once."""
        cache: dict[str, str | None] = self.__dict__.setdefault("_encodings", {})
        if name not in cache:
            cache[name] = self._read_encoding(name)
        return cache[name]

    def _read_encoding(self, name: str) -> str | None:
        enc = self._ds(name).attrs.get("encoding", "")
        enc = None if isinstance(enc, str) and not enc else enc
        if not (enc is None or (isinstance(enc, str) and enc == "bfloat16")):
            raise guard.damaged(self.path, f"{name} has an unknown encoding {str(enc)[:40]!r}")
        return enc

    def rows(self, hook: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Every token's row of a per-token hook over prompts ``start`` to ``stop - 1`` (default:
        all), in prompt order, ``(tokens, *feature)``, in one read: what dictionaries train on."""
        spec = self.resolve(hook)
        if spec.layout == "square":
            raise UserError(f"{hook} is stored per prompt (layout {spec.layout}), not per token")
        stop = self._n if stop is None else min(stop, self._n)
        if not 0 <= start <= stop:
            raise IndexError(f"prompts {start}..{stop} out of range: the run has {self._n}")
        a, b = (int(x) for x in self._offsets_of(spec.stream_of_rows())[[start, stop]])
        return self.token_rows(hook, a, b)

    def token_offsets(self, stream: str = S.MAIN) -> np.ndarray:
        """``(n_prompts + 1,)`` int64: where each committed prompt's tokens start in the run-wide
        token order that :meth:`rows` and :meth:`token_rows` index (a copy)."""
        return np.array(self._offsets_of(stream)[: self._n + 1])

    def token_ids_between(self, start: int, stop: int, stream: str = S.MAIN) -> np.ndarray:
        """Token ids of run-wide token positions ``start`` to ``stop - 1`` (across prompts),
        ``(stop - start,)`` int32, in one read."""
        end = int(self._offsets_of(stream)[self._n])
        if not 0 <= start <= stop <= end:
            raise IndexError(f"tokens {start}..{stop} out of range: the run has {end} committed")
        return self._read(S.ids_name(stream), start, stop, "iu")

    def token_rows(self, hook: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop - 1`` of a per-token hook in run-wide token order (across
        prompt boundaries; :meth:`token_offsets` says where prompts start), ``(stop - start,
        *feature)``, in one read, decoded as :meth:`activation` decodes."""
        spec = self.resolve(hook)
        if spec.layout == "square":
            raise UserError(f"{hook} is stored per prompt (layout {spec.layout}), not per token")
        a, b = int(start), int(stop)
        end = int(self._offsets_of(spec.stream_of_rows())[self._n])
        if not 0 <= a <= b <= end:
            raise IndexError(f"tokens {a}..{b} out of range: the run has {end} committed")
        name = f"{S.ACTS}/{spec.name}"
        ds = self._ds(name)
        guard.bounds(self.path, name, ds, a, b, self.size_bytes)
        if not isinstance(ds, h5py.Dataset):
            return S.decode_values(self._read(name, a, b), self._encoding(name))
        values = np.empty((b - a, *ds.shape[1:]), dtype=ds.dtype)
        try:
            if b > a:
                ds.read_direct(values, np.s_[a:b])  # straight into the result, no second copy
        except OSError as exc:
            raise guard.damaged(self.path, f"{name}: {str(exc).splitlines()[0]}") from None
        return S.decode_values(values, self._encoding(name))

    def to_xarray(self, hook: str | list[str] | tuple[str, ...], prompts: Any = None) -> Any:
        """The stored values of ``hook`` as a labelled ``xarray.DataArray`` (extra ``export``):
        dims ``prompt``, ``position`` (or ``head``, ``query_pos``, ``key_pos`` for attention)
        and the feature axes, coordinates for prompts, tokens, heads and the layer; ragged
        prompts padded with NaN. A list or glob of hooks stacks them along a ``layer`` dim.
        ``prompts``: a range, slice or list of prompt indices (default: all). See
        :func:`workbench.store.labelled.to_xarray`."""
        from workbench.store.labelled import to_xarray

        return to_xarray(self, hook, prompts)

    def attention_row(self, hook: str, i: int, q: int) -> np.ndarray:
        """Row ``q`` of every head of a stored attention pattern (or any square-layout tensor) of
        prompt ``i``: ``activation(hook, i)[:, q, :]``, ``(heads, k)``, reading only that row."""
        spec = self.resolve(hook)
        if spec.layout != "square":
            raise UserError(f"{hook} is not an attention pattern (layout {spec.layout})")
        i = self._check(i)
        start, (heads, nq, nk) = self._square(spec, i)
        if not 0 <= q < nq:
            raise UserError(f"query position {q} is out of range (prompt {i} has {nq} query tokens)")
        name = f"{S.ACTS}/{spec.name}"
        rows = [self._read(name, start + (h * nq + q) * nk, start + (h * nq + q + 1) * nk, "fiu")
                for h in range(heads)]
        return S.decode_values(np.stack(rows), self._encoding(name))

    def axis_tokens(self, hook: str, i: int) -> list[list[str] | None]:
        """For each axis of :meth:`activation`'s result, the tokens indexing it (``None`` for
        non-positional axes): e.g. cross-attention ``[None, decoder tokens, encoder tokens]``."""
        spec = self.resolve(hook)
        if spec.layout == "square":
            q, k = spec.square_streams()
            return [None, self.str_tokens(i, q), self.str_tokens(i, k)]
        return [self.str_tokens(i, spec.stream_of_rows())] + [None] * len(spec.feature_shape)
