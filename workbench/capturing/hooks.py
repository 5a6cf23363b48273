"""Choosing what to capture: presets, glob patterns, and a probe of the real model.

Patterns use TransformerLens hook names. ``*`` matches within one dot-separated segment
(``blocks.*.hook_resid_post``), ``**`` matches across segments (``**.hook_pattern``).

The bridge exposes many names for one tensor (1,725 names on SmolLM2). Two kinds of sharing:

- aliases: several names for one ``HookPoint`` (``blocks.0.hook_resid_post`` is
  ``blocks.0.hook_out``);
- pass-through: different hook points that receive the very same tensor object
  (``blocks.0.hook_resid_post`` is what ``blocks.1.hook_resid_pre`` receives).

:func:`plan_hooks` runs the model twice on tiny inputs with every requested hook point attached,
holding on to the tensors so identity can be checked while they are alive, and stores each distinct
tensor once under one name, with every other name recorded as an alias. The two probe passes use
different batch sizes and lengths (1 x 5, 2 x 9; an encoder-decoder's decoder gets 3, then 6
tokens), which tells the batch axis, each positional axis and the token stream it indexes
(encoder or decoder) apart from the feature axes.
"""

from __future__ import annotations

import copy
import difflib
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from workbench.errors import UserError
from workbench.hooknames import PRESETS, collapse_layers, glob_to_regex, is_glob
from workbench.store.schema import DEC, MAIN, HookSpec

if TYPE_CHECKING:
    from workbench.models.model import Model


@dataclass
class Selection:
    """Hook names chosen by the user's patterns and presets, before probing."""

    names: list[str]
    exact: set[str]
    """Names given literally (not through a glob or preset): these must be stored or it is an error."""
    gates: set[str]


def select(model: Model, items: list[str] | tuple[str, ...]) -> Selection:
    """Expand presets and patterns against the model's hook names. A pattern matching nothing, or
    naming a layer the model does not have, is an error that lists valid names."""
    all_names = list(model.bridge.hook_dict)
    if not items:  # tokens and LM outputs only (e.g. for an analysis that needs nothing more)
        return Selection(names=[], exact=set(), gates=set())
    chosen: dict[str, None] = {}
    exact: set[str] = set()
    gates: set[str] = set()
    n_layers = model.info.n_layers
    for item in items:
        if not item or not item.strip():
            raise UserError("empty hook pattern")
        if item in PRESETS:
            regexes = [glob_to_regex(p) for p in PRESETS[item][1]]
            matched = [n for rx in regexes for n in all_names if rx.match(n)]
            matched = [n for n in matched if model.gated_hook_reason(n) is None]
            if not matched:
                raise UserError(f"preset {item!r} matches no hook of {model.name}")
            chosen.update(dict.fromkeys(matched))
            continue
        for m in re.finditer(r"(?:^|\.)((?:encoder_|decoder_)?blocks)\.(\d+)\.", item):
            layer = int(m.group(2))
            limit = n_layers
            if m.group(1) == "decoder_blocks" and model.info.n_decoder_layers:
                limit = model.info.n_decoder_layers
            if layer >= limit:
                raise UserError(
                    f"layer {layer} in {item!r} is out of range: {model.name} has layers 0-{limit - 1}"
                )
        rx = glob_to_regex(item)
        matched = [n for n in all_names if rx.match(n)]
        if not matched:
            collapsed = sorted({collapse_layers(n) for n in all_names})
            close = difflib.get_close_matches(collapse_layers(item), collapsed, n=4, cutoff=0.5)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise UserError(
                f"hook pattern {item!r} matches no hook of {model.name}{hint} "
                f"(`workbench describe {model.name} --hooks` lists them; presets: {', '.join(PRESETS)})"
            )
        if is_glob(item):
            matched = [n for n in matched if model.gated_hook_reason(n) is None]
            if not matched:
                raise UserError(
                    f"hook pattern {item!r} only matches hooks that need a TransformerLens switch; "
                    "name them exactly to capture them"
                )
        else:
            exact.add(item)
            reason = model.gated_hook_reason(item)
            if reason is not None:
                gates.add(reason)
        chosen.update(dict.fromkeys(matched))
    return Selection(names=list(chosen), exact=exact, gates=gates)


@contextmanager
def gates_enabled(model: Model, gates: set[str] | list[str]) -> Iterator[None]:
    """Turn on the TransformerLens switches some hook points need, and back off afterwards."""
    changed = []
    try:
        for gate in sorted(gates):
            if not model.gate_enabled(gate):
                model.set_gate(gate, True)
                changed.append(gate)
        yield
    finally:
        for gate in reversed(changed):
            model.set_gate(gate, False)


@dataclass
class HookPlan:
    """What a capture stores: one :class:`HookSpec` per distinct tensor."""

    specs: list[HookSpec]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(name, why) for names a pattern matched that cannot be stored."""
    gates: list[str] = field(default_factory=list)
    requested: int = 0


def _probe_tokens(model: Model, batch: int, length: int) -> Any:
    import torch

    ids = model.tokenizer("the quick brown fox jumps over a lazy dog", add_special_tokens=False)["input_ids"]
    row = (ids * (length // max(1, len(ids)) + 1))[:length]
    return torch.tensor([row] * batch, device=model.device)


# (batch, main-stream length, decoder length) of the two probe passes.
PROBES = ((1, 5, 3), (2, 9, 6))


def _probe(model: Model, names: list[str], batch: int, length: int, dec_length: int,
           keep: bool) -> dict[str, Any]:
    """Run the model once with a capture on every hook point in ``names``. Returns, in firing
    order, name -> tensor (``keep``; the references keep every tensor alive) or name -> shape."""
    import torch

    seen: dict[str, Any] = {}

    def make(name: str):  # type: ignore[no-untyped-def]
        def fn(t: Any, hook: Any) -> None:
            if isinstance(t, torch.Tensor) and name not in seen:
                seen[name] = t if keep else tuple(t.shape)

        return fn

    tokens = _probe_tokens(model, batch, length)
    kwargs = {}
    if model.family == "encoder-decoder":
        kwargs["decoder_input"] = _probe_tokens(model, batch, dec_length)
    with torch.inference_mode(), model.bridge.hooks(fwd_hooks=[(n, make(n)) for n in names]):
        model.forward(tokens, **kwargs)
    return seen


def _same_tensor(a: Any, b: Any) -> bool:
    return a is b or (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
        and a.dtype == b.dtype and a.device == b.device
    )


def _axes(feature_shape: tuple[int, ...], model: Model) -> tuple[str, ...]:
    i = model.info
    named = {
        (i.d_model,): ("d_model",),
        (i.n_heads, i.d_head): ("head", "d_head"),
        (i.n_kv_heads, i.d_head): ("kv_head", "d_head"),
        (i.d_vocab,): ("d_vocab",),
        (1,): ("one",),
        (): (),
    }
    if i.d_mlp:
        named.setdefault((i.d_mlp,), ("d_mlp",))
    return named.get(feature_shape, tuple(f"dim{k}" for k in range(len(feature_shape))))


def _storage_name(names: list[str], requested: set[str], canonical: set[str]) -> str:
    """The name a tensor is stored under: a requested name if any, preferring TransformerLens'
    classic names (``hook_resid_post`` over the bridge's ``hook_out``), then the hook point that
    produced the tensor (``names`` is in firing order: ``blocks.0.hook_resid_post`` before
    ``blocks.1.hook_resid_pre``)."""
    pool = [n for n in names if n in requested] or names
    order = {n: k for k, n in enumerate(names)}
    return min(pool, key=lambda n: (n in canonical, order[n]))


def _classify(small: tuple[int, ...], big: tuple[int, ...], enc_dec: bool
              ) -> tuple[str | None, tuple[int, ...], tuple[str, ...]]:
    """Layout, feature shape and the stream of each positional axis, from the shapes seen in the
    two probe passes (:data:`PROBES`)."""
    if len(small) != len(big) or not small:
        return None, (), ()
    (b1, n1, d1), (b2, n2, d2) = PROBES
    roles: list[str | None] = []
    for a, b in zip(small, big):
        if (a, b) == (b1, b2):
            roles.append("batch")
        elif (a, b) == (n1, n2):
            roles.append(MAIN)
        elif enc_dec and (a, b) == (d1, d2):
            roles.append(DEC)
        elif a == b:
            roles.append(None)  # a feature axis
        else:
            return None, (), ()
    if roles[0] != "batch" or "batch" in roles[1:]:
        return None, (), ()
    pos = [k for k, r in enumerate(roles) if r in (MAIN, DEC)]
    if pos == [1]:
        return "token", tuple(small[2:]), (str(roles[1]),)
    if len(small) == 4 and pos == [2, 3]:
        return "square", (small[1],), (str(roles[2]), str(roles[3]))
    return None, (), ()


def _pos_name(stream: str, enc_dec: bool, role: str = "") -> str:
    if not enc_dec:
        return f"{role}_pos" if role else "pos"
    side = "dec" if stream == DEC else "enc"
    return f"{side}_{role}_pos" if role else f"{side}_pos"


_PLANS: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], HookPlan]] = weakref.WeakKeyDictionary()
"""Hook plans by model and selection: probing runs the model twice (seconds on a real model), and
its outcome depends only on the model and the names chosen, so a model kept loaded (the terminal
UI's live prompts, a script capturing run after run) probes each selection once."""


def plan_hooks(model: Model, selection: Selection) -> HookPlan:
    """Probe the model and decide what is stored (see the module docstring); remembered for as
    long as ``model`` lives (a copy is returned, so a caller may change it)."""
    key = (tuple(selection.names), tuple(sorted(selection.exact)), tuple(sorted(selection.gates)))
    known = _PLANS.setdefault(model, {})
    if key not in known:
        known[key] = _plan_hooks(model, selection)
    return copy.deepcopy(known[key])


def _plan_hooks(model: Model, selection: Selection) -> HookPlan:
    bridge = model.bridge
    hook_dict = bridge.hook_dict
    requested = set(selection.names)
    # Every name of each requested hook point, and one representative name per hook point.
    by_point: dict[int, list[str]] = {}
    for name, hp in hook_dict.items():
        by_point.setdefault(id(hp), []).append(name)
    points: dict[int, str] = {}
    for name in selection.names:
        points.setdefault(id(hook_dict[name]), hook_dict[name].name or name)
    canonical = {hp.name for hp in hook_dict.values() if hp.name}
    skipped: list[tuple[str, str]] = []
    with gates_enabled(model, selection.gates):
        rep_names = list(points.values())
        small = _probe(model, rep_names, *PROBES[0], keep=False)
        big = _probe(model, rep_names, *PROBES[1], keep=True)
        # The first hook point to see a tensor is the one that produced it.
        fired = {name: k for k, name in enumerate(big)}
        order = sorted(points, key=lambda pid: fired.get(points[pid], len(fired)))
        # Group hook points that received the very same tensor (checked while all are alive).
        groups: list[list[int]] = []
        reps: list[Any] = []
        for pid in order:
            t = big.get(points[pid])
            if t is None:
                continue
            for g, rt in zip(groups, reps):
                if _same_tensor(t, rt):
                    g.append(pid)
                    break
            else:
                groups.append([pid])
                reps.append(t)
        big_shapes = {k: tuple(v.shape) for k, v in big.items()}
        floating = {k: v.is_floating_point() for k, v in big.items()}
        del big, reps
    for pid in order:
        if points[pid] not in big_shapes:
            skipped += [(n, "it never fires in this model's forward pass")
                        for n in by_point[pid] if n in requested]
    enc_dec = model.family == "encoder-decoder"
    specs: list[HookSpec] = []
    for group in groups:
        rep = points[group[0]]
        sa, sb = small[rep], big_shapes[rep]
        names = [n for pid in group for n in by_point[pid]]
        layout, feature, streams = _classify(sa, sb, enc_dec)
        if layout is None:
            skipped += [(n, f"it holds no value per prompt and token (shapes {sa} and {sb})")
                        for n in names if n in requested]
            continue
        store_as = _storage_name(names, requested, canonical)
        axes: tuple[str, ...]
        if layout == "square":
            axes = ("head", _pos_name(streams[0], enc_dec, "query"),
                    _pos_name(streams[1], enc_dec, "key"))
        else:
            axes = (_pos_name(streams[0], enc_dec), *_axes(feature, model))
        specs.append(HookSpec(
            name=store_as, layout=layout, feature_shape=feature, axes=axes,
            kind="float" if floating[rep] else "int",
            aliases=tuple(sorted(n for n in names if n != store_as)),
            streams=streams,
        ))
    for name, why in skipped:
        if name in selection.exact:
            raise UserError(f"hook {name!r} cannot be captured: {why}")
    if not specs and selection.names:
        raise UserError("the requested hooks hold nothing that can be stored per prompt")
    return HookPlan(specs=specs, skipped=skipped, gates=sorted(selection.gates),
                    requested=len(requested))
