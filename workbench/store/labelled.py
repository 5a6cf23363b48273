"""A run's stored hooks as labelled arrays: :func:`to_xarray` (``Run.to_xarray``), for analysis
by name (``da.sel(prompt=3, position=5, head=2)``, ``da.mean("position")``) rather than by
remembering axis order.

The result is an ``xarray.DataArray`` held in memory (xarray is imported here, lazily: extra
``export``):

- dims ``prompt`` then the hook's own axes, with ``pos`` called ``position`` (a per-token hook:
  ``prompt, position, d_model``; per head: ``prompt, position, head, d_head``; an attention
  pattern: ``prompt, head, query_pos, key_pos``). Encoder-decoder axes keep their names
  (``enc_pos``, ``dec_query_pos`` ...).
- Prompts are ragged: every prompt is padded to the longest one with **NaN** (integer hooks
  become float64 to hold it). ``n_tokens`` (per prompt) says where each prompt's own values end;
  ``da.isnull()`` says the same per value. Positions are counted from each prompt's first token.
- coordinates: ``prompt`` (the run's prompt indices), ``prompt_id`` and ``n_tokens`` along it;
  ``position``/``query_pos``/``key_pos``/``head``/``kv_head`` as 0, 1, 2...; ``token_id`` and
  ``token`` (the token strings, ``""`` in padding) along ``prompt, position`` for per-token
  hooks; ``layer`` (from ``blocks.L.``) and ``hook`` as scalar coordinates.
- Several hooks (a list, or a glob such as ``blocks.*.hook_resid_post``) of the same shape stack
  along a new leading ``layer`` dim, in layer order, with ``hook`` along it; each must name its
  layer (``blocks.L.``).

Values are exactly :meth:`Run.activation`'s (float32 for bfloat16 runs, float16 for float16
runs). Numpy only at import; never torch.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import numpy as np

from workbench.errors import UserError

LAYER = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
POSITION_DIMS = {"pos": "position"}
COUNTED = ("head", "kv_head")
"""Feature axes given 0, 1, 2... coordinates (the others are plain vector components)."""


def layer_of(hook: str) -> int | None:
    """The layer a TransformerLens hook name belongs to (``blocks.3.attn.hook_z`` -> 3)."""
    m = LAYER.search(hook)
    return int(m.group(1)) if m else None


def _xarray() -> Any:
    try:
        import xarray
    except ImportError:
        raise UserError("Run.to_xarray needs xarray (pip install 'workbench[export]')") from None
    return xarray


def _prompt_indices(run: Any, prompts: Any) -> list[int]:
    n = len(run)
    if prompts is None:
        return list(range(n))
    if isinstance(prompts, slice):
        return list(range(n))[prompts]
    if isinstance(prompts, int | np.integer):
        prompts = [int(prompts)]
    out = []
    for i in prompts:
        if not -n <= int(i) < n:
            raise IndexError(f"prompt {i} out of range: the run has {n} committed prompts")
        out.append(int(i) % n)
    return out


def select_hooks(run: Any, hook: str | list[str] | tuple[str, ...]) -> tuple[list[str], bool]:
    """The hook names a selection means, and whether it is several (stacked by layer): a name
    the run answers to, a glob over those names, or a list of either."""
    items = [hook] if isinstance(hook, str) else list(hook)
    if not items:
        raise UserError("no hook given")
    names: list[str] = []
    for item in items:
        if any(c in item for c in "*?["):
            matched = [h for h in run.hook_names if fnmatch.fnmatchcase(h, item)]
            if not matched:
                raise UserError(f"no stored hook matches {item!r} (stored: {', '.join(sorted(run.hooks))})")
            names += [h for h in matched if h not in names]
        else:
            run.resolve(item)  # an unknown name is a UserError with suggestions
            if item not in names:
                names.append(item)
    return names, not (isinstance(hook, str) and len(names) == 1 and names[0] == hook)


def _one(run: Any, hook: str, index: list[int], xr: Any) -> Any:
    spec = run.resolve(hook)
    lengths = {s: np.array([run.n_tokens(i, s) for i in index], dtype=np.int64)
               for s in dict.fromkeys(spec.streams or ("tokens",))}
    if spec.layout == "square":
        q, k = spec.square_streams()
        shape = (len(index), spec.feature_shape[0], int(lengths[q].max(initial=0)),
                 int(lengths[k].max(initial=0)))
    else:
        rows = spec.stream_of_rows()
        shape = (len(index), int(lengths[rows].max(initial=0)), *spec.feature_shape)
    dims = ["prompt", *(POSITION_DIMS.get(a, a) for a in spec.axes)]
    sample_kind = "f" if spec.kind == "float" else "i"
    dtype = np.dtype(np.float16 if run.storage_dtype == "float16" else np.float32) \
        if sample_kind == "f" else np.dtype(np.float64)
    values = np.full(shape, np.nan, dtype=dtype)
    for j, i in enumerate(index):
        a = run.activation(hook, i)
        values[(j, *(slice(0, n) for n in a.shape))] = a
    coords: dict[str, Any] = {
        "prompt": index,
        "prompt_id": ("prompt", [run.prompt_id(i) for i in index]),
        "n_tokens": ("prompt", lengths[spec.stream_of_rows() if spec.layout != "square"
                                      else spec.square_streams()[0]]),
        "hook": hook,
    }
    for d, size in zip(dims[1:], shape[1:], strict=True):
        if d in COUNTED or d.endswith("pos") or d == "position":
            coords[d] = np.arange(size)
    if spec.layout != "square":
        ids = np.full(shape[:2], -1, dtype=np.int64)
        strs = np.full(shape[:2], "", dtype=object)
        for j, i in enumerate(index):
            t = run.tokens(i, spec.stream_of_rows())
            ids[j, : len(t)] = t
            strs[j, : len(t)] = run.str_tokens(i, spec.stream_of_rows())
        coords["token_id"] = (dims[:2], ids)
        coords["token"] = (dims[:2], strs)
    layer = layer_of(hook)
    if layer is not None:
        coords["layer"] = layer
    return xr.DataArray(values, dims=dims, coords=coords, name=hook,
                        attrs={"run": str(run.path), "run_id": run.run_id,
                               "storage_dtype": run.storage_dtype,
                               "padding": "NaN past each prompt's n_tokens"})


def to_xarray(run: Any, hook: str | list[str] | tuple[str, ...], prompts: Any = None) -> Any:
    """``run``'s stored ``hook`` (a name, a glob, or a list) as a labelled ``xarray.DataArray``
    (module docstring); ``prompts``: a slice, range or list of prompt indices (default all)."""
    xr = _xarray()
    names, several = select_hooks(run, hook)
    index = _prompt_indices(run, prompts)
    if not several:
        return _one(run, names[0], index, xr)
    layers = {h: layer_of(h) for h in names}
    unplaced = [h for h, layer in layers.items() if layer is None]
    if unplaced:
        raise UserError(f"stacking hooks by layer needs blocks.L. in each name; {', '.join(unplaced)} has none")
    if len(set(layers.values())) != len(names):
        raise UserError(f"two of the hooks {', '.join(names)} are in the same layer; "
                        "stack one kind of hook across layers")
    ordered = sorted(names, key=lambda h: layers[h])  # type: ignore[arg-type, return-value]
    parts = [_one(run, h, index, xr) for h in ordered]
    first = parts[0]
    for p in parts[1:]:
        if p.dims != first.dims or p.shape != first.shape:
            raise UserError(f"{p.name} {dict(p.sizes)} and {first.name} {dict(first.sizes)} differ in "
                            "shape: stack one kind of hook across layers")
    stacked = xr.concat(parts, dim="layer", coords="different", compat="equals",
                        combine_attrs="drop_conflicts")
    stacked.name = " | ".join(ordered) if len(ordered) <= 3 else f"{ordered[0]} ... {ordered[-1]}"
    return stacked
