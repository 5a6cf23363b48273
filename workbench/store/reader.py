"""Reading runs lazily, without the model and without torch.

``open_run(path)`` opens a finished run, a run another process is still writing (it sees the
prompts committed so far; :meth:`Run.refresh` picks up more) or a run whose writer was killed.
Every accessor reads only the slice it needs.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from workbench.errors import UserError
from workbench.store import codecs, guard, shards
from workbench.store import schema as S
from workbench.store.files import (
    final_name,
    lock_path,
    open_readonly,
    opened_twice,
    partial_path,
    writer_alive,
)
from workbench.store.hook_reads import HookReads
from workbench.store.live_shards import LiveShards
from workbench.store.settings import NewerSettings, RunSettings
from workbench.store.vocab_reads import VocabReads

__all__ = ["Run", "lock_path", "open_run", "partial_path", "read_ragged", "writer_alive"]


def read_ragged(get: Callable[[str], h5py.Dataset], name: str, i: int, path: Path | str = "",
                file_bytes: Callable[[], int] | None = None) -> bytes:
    """Entry ``i`` of a ragged byte field (``prompts/text``, ``prompts/id``, ``prompts/meta``);
    ``get`` returns a dataset by name (``h5py.File.__getitem__``, or a run's refreshed handles).
    Offsets that decrease or point past the data are damage (:mod:`~workbench.store.guard`)."""
    oname, data = S.offsets_name(name), get(name)
    start, end = guard.offsets(path, oname, guard.read(path, oname, get(oname), i, i + 2), 2, data.shape[0])
    return bytes(guard.read(path, name, data, int(start), int(end), file_bytes))


class Run(HookReads, VocabReads):
    """A captured run. Use :func:`open_run`."""

    def __init__(self, path: Path, *, live_shards: bool = False) -> None:
        self.path = path
        self.final_path = final_name(path)
        self.is_partial = live_shards or path.name.endswith(S.PARTIAL_SUFFIX)
        try:
            # A sharded capture still running has no index yet: read its units' committed prefix.
            self.f = LiveShards(path) if live_shards else open_readonly(path, swmr=self.is_partial)
        except FileNotFoundError:
            raise UserError(f"no such run: {path}") from None
        except PermissionError:
            raise UserError(f"cannot read {path}: permission denied") from None
        except OSError as exc:
            if not h5py.is_hdf5(path):
                raise UserError(f"{path} is not a workbench run (not an HDF5 file)") from None
            raise UserError(f"{path} is damaged or unreadable ({str(exc).splitlines()[0]})") from None
        try:
            if self.f.attrs.get(S.ATTR_SCHEMA) != S.SCHEMA:
                raise UserError(f"{path} is an HDF5 file but not a workbench run")
            version = int(self.f.attrs.get(S.ATTR_VERSION, -1))
            if version > S.SCHEMA_VERSION:
                raise UserError(
                    f"{path} uses run format {version}; this workbench reads up to "
                    f"{S.SCHEMA_VERSION} (upgrade workbench)"
                )
            self._datasets: dict[str, h5py.Dataset] = {}
            self._shared = not live_shards and opened_twice(self.f)
            self._direct: shards.DirectReads | None = None  # a sharded index's unit files
            self._stale: set[str] = set()
            self._stream_offsets: dict[str, np.ndarray] = {}
            self._vocab: tuple[np.ndarray, bytes] | None = None
            self._offsets = self._ds(S.TOKEN_OFFSETS)
            self._n = self._committed()
            # Small, and read by nearly everything: parsing them now turns damage into a clear
            # error at open time rather than a confusing one later.
            for doc in ("model_info", "settings", "capture_settings", "hooks"):
                getattr(self, doc)
            codecs.register(path, self.settings.get("compression"))  # hdf5plugin's filters
            self.shards: list[dict[str, Any]] = []
            """A sharded run's unit files (``file``, ``unit``, ``first_prompt``, ``prompts``), each
            checked when the run is opened (:func:`~workbench.store.shards.check_shards`); empty
            for a run in one file."""
            if self._has(shards.META_SHARDS):
                opened: dict[str, Any] = {}
                self._direct = shards.DirectReads(path, opened)  # closes them with the run
                self.shards = shards.check_shards(path, self.f, self.capture_settings.run_id, opened)
        except UserError:
            if getattr(self, "_direct", None) is not None:
                self._direct.close()
            self.f.close()
            raise
        except NewerSettings as exc:
            self.f.close()
            raise UserError(f"{path}: {exc}") from None
        except (KeyError, OSError, ValueError, TypeError, OverflowError) as exc:
            self.f.close()
            raise UserError(f"{path} is a damaged workbench run ({exc})") from None

    # --- life cycle --------------------------------------------------------------------------

    def _committed(self) -> int:
        return max(0, int(self._offsets.shape[0]) - 1)

    def _ds(self, name: str) -> h5py.Dataset:
        """A dataset handle, refreshed (SWMR) if :meth:`refresh` was called since its last use."""
        ds = self._datasets.get(name)
        if ds is None:
            ds = guard.dataset(self.path, self.f, name)
            guard.check_dtype(self.path, name, ds)
            if name.startswith(S.ACTS + "/") and name[len(S.ACTS) + 1 :] in self.hooks:
                guard.check_hook_dataset(self.path, self.hooks[name[len(S.ACTS) + 1 :]], ds)
            if self._shared:
                ds.refresh()  # another handle's cached extents (files.opened_twice)
            if self._direct is not None:
                ds = self._direct.wrap(ds)
            self._datasets[name] = ds
            if not self.is_partial:
                self._check_length(name, ds)
        elif name in self._stale:
            ds.refresh()
            self._stale.discard(name)
        return ds

    def _check_length(self, name: str, ds: h5py.Dataset) -> None:
        """A finished run's datasets have exactly the rows its offsets commit (a clean close trims
        them): a longer or shorter one is damage (never-written rows would read as zeros, a
        shortened offsets vector would cut a text short)."""
        if name == S.TOKEN_OFFSETS:
            return  # it defines the committed count
        group, _, leaf = name.rpartition("/")
        n, rows = self._n, None
        if group == S.ACTS and leaf in self.hooks:
            spec = self.hooks[leaf]
            rows = (self._last(f"{S.ACTS_OFFSETS}/{leaf}", n) if spec.layout == "square"
                    else int(self._offsets_of(spec.stream_of_rows())[-1]))
        elif group == S.ACTS_OFFSETS or name in self._prompt_offsets:
            rows = n + 1
        elif name in S.RAGGED_BYTES:
            rows = self._last(S.offsets_name(name), n)
        elif name == S.N_INPUT:
            rows = n
        elif group in self.streams and leaf != "ids":
            total = int(self._offsets_of(group)[-1])
            rows = {"str_offsets": total + 1, "str": None}.get(leaf, total)
            if leaf == "str":
                rows = self._last(S.offsets_name(name), total)
        elif group == "vocab" and leaf in ("str", "bytes"):
            rows = self._last(S.offsets_name(name), self._ds(S.offsets_name(name)).shape[0] - 1)
        if rows is not None and ds.shape[0] != rows:
            raise guard.damaged(self.path, f"{name} has {ds.shape[0]:,} rows; the run's offsets say {rows:,}")

    @cached_property
    def _prompt_offsets(self) -> set[str]:
        return {S.offsets_name(r) for r in S.RAGGED_BYTES} | {S.stream_offsets(s) for s in self.streams}

    def _last(self, offsets: str, i: int) -> int:
        """Entry ``i`` of an offsets dataset (where the data it indexes ends)."""
        return int(self._read(offsets, i, i + 1, "iu")[0])

    def _complete(self, *names: str) -> bool:
        """Whether the run holds parts that are written together: all (True), none (False), or
        some — damage."""
        held = [self._has(x) for x in names]
        if any(held) and not all(held):
            missing = [x for x, h in zip(names, held, strict=True) if not h]
            raise guard.damaged(self.path, f"{', '.join(missing)} missing beside {names[held.index(True)]}")
        return all(held)

    def refresh(self) -> int:
        """Pick up prompts committed since opening (or the last refresh); returns the count.
        Datasets are refreshed lazily, each the first time it is read afterwards."""
        self._offsets.refresh()
        self._stale = set(self._datasets) - {S.TOKEN_OFFSETS}
        self._stream_offsets.clear()
        self._n = self._committed()
        return self._n

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        self.f.close()

    def __enter__(self) -> Run:  # noqa: PYI034 - Run is not meant to be subclassed
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"<Run {self.path.name}: {self._n} prompts, {len(self.hooks)} stored hooks, {self.status}>"

    # --- run-level metadata -------------------------------------------------------------------

    def _json(self, name: str, kind: type = dict) -> Any:
        return guard.json_doc(self.path, name, guard.dataset(self.path, self.f, name)[()], kind)

    @cached_property
    def model_info(self) -> dict[str, Any]:
        """The model's self-description and provenance at capture time."""
        return guard.check_model_info(self.path, self._json(S.META_MODEL))

    @cached_property
    def settings(self) -> dict[str, Any]:
        """Capture settings: hook patterns, dtype, batch size, BOS policy, tool version, ..."""
        return self._json(S.META_SETTINGS)  # type: ignore[no-any-return]

    @cached_property
    def capture_settings(self) -> RunSettings:
        """The capture settings, typed (:class:`~workbench.store.settings.RunSettings`); runs
        written before the settings were versioned read with ``model_info``'s values filled in."""
        return RunSettings.from_dict(self.settings, self.model_info)

    @property
    def family(self) -> str:
        """``decoder``, ``encoder`` or ``encoder-decoder``."""
        return self.capture_settings.family

    @property
    def model_name(self) -> str:
        """The name the run's model was loaded by (``workbench models``)."""
        return self.capture_settings.model_name

    @property
    def run_id(self) -> str:
        """Identifies this capture (kept across ``--resume``); results beside the run record it,
        so results of an earlier run captured to the same path are told apart."""
        rid = self.capture_settings.run_id
        return rid if rid else f"{self.f.attrs.get(S.ATTR_CREATED, '')}"

    @property
    def planned_prompts(self) -> int:
        try:
            return int(self.f.attrs.get(S.ATTR_PLANNED, 0))
        except (TypeError, ValueError):
            raise guard.damaged(self.path, f"attribute {S.ATTR_PLANNED} is not a number") from None

    @property
    def n_prompts(self) -> int:
        return self._n

    @property
    def status(self) -> str:
        """``complete``, ``in progress`` (a writer holds the lock) or ``interrupted``. A run opened
        while it was written is complete once its capture renamed this very file (then unlocked)."""
        if not self.is_partial:
            return "complete"
        if writer_alive(self.final_path):
            return "in progress"
        return "complete" if self._same_file(self.final_path) else "interrupted"

    def _same_file(self, path: Path) -> bool:
        try:  # a live sharded run has no single file (no .id)
            mine, other = os.fstat(self.f.id.get_vfd_handle()), path.stat()
        except (AttributeError, OSError, TypeError, ValueError):
            return False
        return (mine.st_dev, mine.st_ino) == (other.st_dev, other.st_ino)

    @property
    def storage_dtype(self) -> str:
        return str(self.f.attrs.get("storage_dtype", "float32"))

    @cached_property
    def streams(self) -> tuple[str, ...]:
        """Token streams: ``("tokens",)``, plus ``"dec_tokens"`` for encoder-decoders."""
        streams = tuple(str(self.f.attrs.get("streams", S.MAIN)).split(","))
        if streams not in ((S.MAIN,), (S.MAIN, S.DEC)):
            raise guard.damaged(self.path, f"unknown token streams {','.join(streams)[:80]!r}")
        return streams

    @property
    def lm_stream(self) -> str:
        """The stream the language-model outputs (loss, predictions, targets) belong to."""
        return S.DEC if S.DEC in self.streams else S.MAIN

    @property
    def has_lm_outputs(self) -> bool:
        return self._complete(*(f"{self.lm_stream}/{x}" for x in (S.LOSS, S.TOPK_IDS, S.TOPK_LOGPROBS)))

    @property
    def has_generation(self) -> bool:
        return self._has(f"{self.lm_stream}/{S.GEN_FIELDS[0]}")

    # --- per-prompt --------------------------------------------------------------------------

    def _check(self, i: int) -> int:
        if not -self._n <= i < self._n:
            raise IndexError(f"prompt {i} out of range: the run has {self._n} committed prompts")
        return i % self._n

    def _offsets_of(self, stream: str) -> np.ndarray:
        cached = self._stream_offsets.get(stream)
        if cached is None or len(cached) < self._n + 1:
            if stream not in self.streams:
                raise UserError(f"this run has no {stream!r} stream (streams: {', '.join(self.streams)})")
            name, n = S.stream_offsets(stream), self._n + 1
            ids = self._ds(S.ids_name(stream)).shape[0]
            cached = guard.offsets(self.path, name, self._read(name, 0, n), n, ids)
            if not self.is_partial and cached[-1] != ids:  # a finished run is trimmed to its tokens
                raise guard.damaged(self.path, f"{S.ids_name(stream)} has {ids:,} rows; {name} says {cached[-1]:,}")
            self._stream_offsets[stream] = cached
        return cached

    @property
    def _token_offsets(self) -> np.ndarray:
        return self._offsets_of(S.MAIN)

    def _ragged(self, name: str, i: int) -> bytes:
        return read_ragged(self._ds, name, self._check(i), self.path, self.size_bytes)

    def _token_range(self, i: int, stream: str = S.MAIN) -> tuple[int, int]:
        i = self._check(i)
        start, end = self._offsets_of(stream)[i : i + 2]
        return int(start), int(end)

    @property
    def prompts(self) -> list[str]:
        """Prompt texts of the committed prompts, in capture order."""
        return self.prompt_texts(0, self._n)

    def prompt_texts(self, start: int, stop: int) -> list[str]:
        """Texts of prompts ``start`` to ``stop - 1`` (committed ones), read in one go."""
        stop = min(stop, self._n)
        if start >= stop:
            return []
        name, text = S.offsets_name(S.PROMPT_TEXT), self._ds(S.PROMPT_TEXT)
        offsets = guard.offsets(self.path, name, self._read(name, start, stop + 1),
                                stop - start + 1, text.shape[0])
        blob = self._read(S.PROMPT_TEXT, int(offsets[0]), int(offsets[-1])).tobytes()
        base = int(offsets[0])
        return [guard.text(self.path, S.PROMPT_TEXT, blob[int(a) - base : int(b) - base])
                for a, b in itertools.pairwise(offsets)]

    @property
    def prompt_ids(self) -> list[str]:
        return [self.prompt_id(i) for i in range(self._n)]

    def prompt(self, i: int) -> str:
        return guard.text(self.path, S.PROMPT_TEXT, self._ragged(S.PROMPT_TEXT, i))

    def prompt_id(self, i: int) -> str:
        return guard.text(self.path, S.PROMPT_ID, self._ragged(S.PROMPT_ID, i))

    def metadata(self, i: int) -> dict[str, Any]:
        """The prompt's metadata (JSONL fields beyond ``prompt`` and ``id``: ``answer``, ``wrong``,
        ``corrupted``, anything else)."""
        return guard.json_doc(self.path, S.PROMPT_META, self._ragged(S.PROMPT_META, i), dict)  # type: ignore[no-any-return]

    def n_tokens(self, i: int, stream: str = S.MAIN) -> int:
        start, end = self._token_range(i, stream)
        return end - start

    def tokens(self, i: int, stream: str = S.MAIN) -> np.ndarray:
        """Token ids, ``(seq,)`` int32, as the model saw them (BOS included if the policy added it).
        ``stream="dec_tokens"``: an encoder-decoder's decoder input."""
        start, end = self._token_range(i, stream)
        return self._read(S.ids_name(stream), start, end, "iu")

    def str_tokens(self, i: int, stream: str = S.MAIN) -> list[str]:
        """Each token decoded on its own (TransformerLens' ``to_str_tokens``)."""
        start, end = self._token_range(i, stream)
        name, strs = S.offsets_name(S.str_name(stream)), self._ds(S.str_name(stream))
        ends = guard.offsets(self.path, name, self._read(name, start, end + 1), end - start + 1, strs.shape[0])
        blob = bytes(self._read(S.str_name(stream), int(ends[0]), int(ends[-1])))
        base = int(ends[0])
        return [guard.text(self.path, S.str_name(stream), blob[a - base : b - base])
                for a, b in itertools.pairwise(ends)]

    def _lm(self, name: str, i: int) -> np.ndarray:
        if not self.has_lm_outputs:
            raise UserError("this run has no loss or predictions: its model has no trained LM head")
        start, end = self._token_range(i, self.lm_stream)
        return self._read(f"{self.lm_stream}/{name}", start, end, "fiu")

    @property
    def lm_target(self) -> str:
        """What the stored predictions are about: ``next`` (decoders, and an encoder-decoder's
        decoder) or ``same`` (a masked-LM encoder predicts the token at its own position)."""
        return self.capture_settings.lm_target

    def loss(self, i: int) -> np.ndarray:
        """Per-token loss ``(seq,)`` on the LM stream: ``-log p(target[t])`` where the target is the
        next token (decoders; NaN at the last position), the token itself (encoders), or the
        decoder's target (encoder-decoders, see :meth:`targets`)."""
        return self._lm(S.LOSS, i)

    def top_k(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k predictions at every position of the LM stream: ids ``(seq, k)``, log-probs."""
        return self._lm(S.TOPK_IDS, i), self._lm(S.TOPK_LOGPROBS, i)

    def targets(self, i: int) -> np.ndarray:
        """An encoder-decoder's target token at each decoder position (-1 where none was given)."""
        if self.lm_stream != S.DEC:
            raise UserError("targets exist for encoder-decoder runs only; a decoder's target is the next token")
        return self._lm(S.TARGET, i)

    def n_input_tokens(self, i: int) -> int:
        """Tokens of the LM stream that came from the prompt; the rest were generated."""
        i = self._check(i)
        return int(self._read(S.N_INPUT, i, i + 1, "iu")[0])

    def generation(self, i: int) -> dict[str, np.ndarray]:
        """Per token of a generated run: the sampling distribution's entropy (nats) and the chosen
        token's probability under it (``sample_*``), and the same under the model's own
        distribution at temperature 1 (``model_*``). NaN at prompt positions."""
        if not self.has_generation:
            raise UserError("this run holds no generated tokens (capture with --generate N)")
        start, end = self._token_range(i, self.lm_stream)
        return {f: self._read(f"{self.lm_stream}/{f}", start, end, "fiu") for f in S.GEN_FIELDS}

    def _has(self, name: str) -> bool:
        """Whether the run holds ``name``; damaged metadata on the way is damage, not a KeyError."""
        try:
            return name in self.f
        except (KeyError, OSError) as exc:
            raise guard.damaged(self.path, f"{name}: {str(exc).strip(chr(39)).splitlines()[0]}") from None

    def _read(self, name: str, start: int, end: int, kinds: str = "") -> np.ndarray:
        """Rows ``start:end`` of dataset ``name``, checked (:func:`workbench.store.guard.read`)."""
        ds = self._ds(name)
        if kinds and ds.dtype.kind not in kinds:
            raise guard.damaged(self.path, f"{name} holds {ds.dtype}")
        return guard.read(self.path, name, ds, start, end, self.size_bytes)

    def size_bytes(self) -> int:
        """Bytes on disk: the file, and a sharded run's unit files."""
        if isinstance(self.f, LiveShards):
            return self.f.size_bytes()
        units = sum((self.path.parent / e["file"]).stat().st_size for e in self.shards)
        return os.fstat(self.f.id.get_vfd_handle()).st_size + units  # still there once renamed

    def n_tokens_total(self, stream: str = S.MAIN) -> int:
        return int(self._offsets_of(stream)[-1]) if self._n else 0

    def summary(self, n_prompts: int = 5) -> dict[str, Any]:
        """A JSON-ready overview (what ``workbench inspect --json`` prints)."""
        info = self.model_info
        first = [
            {"index": i, "id": self.prompt_id(i), "n_tokens": self.n_tokens(i),
             "text": self.prompt(i), "metadata": self.metadata(i)}
            for i in range(min(n_prompts, self._n))
        ]
        return {
            "path": str(self.path),
            "status": self.status,
            "bytes": self.size_bytes(),
            "prompts": self._n,
            "planned_prompts": self.planned_prompts,
            "tokens": {s: self.n_tokens_total(s) for s in self.streams},
            "model": {k: info.get(k) for k in ("name", "family", "architecture", "n_layers",
                                               "n_heads", "n_kv_heads", "d_model", "d_vocab")},
            "provenance": info.get("provenance"),
            "bos": info.get("bos"),
            "storage_dtype": self.storage_dtype,
            "settings": {k: self.settings.get(k) for k in (
                "hooks_requested", "batch_size", "compression", "top_k", "truncate", "gates",
                "generation", "chat", "resumed", "versions")},
            "stored_hooks": [h.to_dict() for h in self.hooks.values()],
            "has_lm_outputs": self.has_lm_outputs,
            "lm_target": self.lm_target if self.has_lm_outputs else None,
            "generated": self.has_generation,
            "shards": [{k: e[k] for k in ("file", "unit", "first_prompt", "prompts")} for e in self.shards],
            "first_prompts": first,
        }


def open_run(path: str | os.PathLike[str]) -> Run:
    """Open a run for reading. ``path`` may name the finished file (``run.h5``) or its partial file
    (``run.h5.partial``); if only the partial exists, that is opened."""
    p = Path(path).expanduser()
    if not p.exists():
        partial = partial_path(p)
        if partial.exists():
            p = partial
        elif shards.read_units_file(p) is not None:
            return Run(p, live_shards=True)
    if p.is_dir():
        raise UserError(f"{p} is a folder, not a run file")
    return Run(p)
