"""``sae``: a sparse autoencoder (a TopK dictionary) trained on one hook of a run.

``workbench analyze RUN sae --param sae.hook=blocks.12.hook_resid_post`` streams the hook's rows
from the run (``sae_data``: contiguous blocks of prompts in a shuffled order through a shuffling
buffer of ``buffer`` tokens, so memory is the buffer, not the run), leaves out the positions that
poison dictionaries (a decoder's first position, special tokens, rows of outlying norm), holds out a share of the prompts,
and trains EleutherAI's ``sparsify`` ``SparseCoder`` (TopK; ``multi_topk`` as an option) with its
own recipe: Adam at ``2e-4 / sqrt(features / 2^14)`` with a linear warm-up and decay, decoder rows
kept at unit norm with the gradient parallel to them removed, the fraction of variance unexplained
as the loss, and the AuxK loss (``auxk``) on features that have not fired for ``dead_tokens``.

Why sparsify and not SAELens: SAELens (the field's library) declares ``transformer-lens<4`` and the
versions without that bound fail on import under TransformerLens 4.x; ``eai-sparsify`` installs
beside our stack and its ``SparseCoder`` trains from activations we feed it. Its saved files are
not SAELens' format, so the result stores the SAE as a SAELens folder written by
:mod:`workbench_plugins.sae_format` (arrays ``sae_cfg_json`` and ``sae_weights``: the bytes of
``cfg.json`` and ``sae_weights.safetensors``); ``workbench sae-export`` writes the folder.

Metrics on the held-out prompts: MSE, explained variance, L0, dead (never fired there) and dense
(firing on more than 10% of tokens) features; and, where the run's model can be reloaded (decoders),
the next-token loss with the hook's activation replaced by the reconstruction at the used
positions, against the clean loss and against zeros there: CE recovered
``(L_zero - L_sae) / (L_zero - L_clean)``.
"""

from __future__ import annotations

import contextlib
import io
import math
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from workbench_plugins import sae_data
from workbench_plugins.sae_format import SAE, from_bytes, load_folder

from workbench import hookimpl
from workbench.analysis import Analysis, AnalysisContext, Param, Result
from workbench.errors import UserError

if TYPE_CHECKING:
    import torch

    from workbench.store.reader import Run
    from workbench.store.results import StoredResult

LIBRARY = "eai-sparsify"
DENSE_SHARE = 0.1
"""A feature firing on more than this share of held-out tokens is reported as dense."""


def import_sparsify() -> Any:
    """``sparsify``, imported quietly (it prints a note about Triton to stdout on import)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import sparsify
    except ImportError:
        raise UserError("training an SAE needs the eai-sparsify package (pip install 'eai-sparsify==1.3.3')") from None
    return sparsify


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{LIBRARY} {version(LIBRARY)}"
    except PackageNotFoundError:
        return LIBRARY


def device_of(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(choice)
    except (RuntimeError, ValueError):
        raise UserError(f"device {choice!r} is not a device (cpu, cuda, cuda:N, auto)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"device {choice!r}: no such CUDA device here")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {choice!r}: use cpu, cuda, cuda:N or auto")
    return choice


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


# --- training -----------------------------------------------------------------------------------


def to_sae(coder: Any, hook: str, model_name: str, extra: dict[str, Any]) -> SAE:
    """sparsify's ``SparseCoder`` as a SAELens-format :class:`SAE`: ``W_enc`` is its encoder
    weight transposed, ``W_dec`` its decoder as is (``(d_sae, d_in)``), ``b_dec`` subtracted from
    the input before encoding (sparsify does the same)."""
    return SAE(architecture="topk", W_enc=coder.encoder.weight.detach().cpu().numpy().T.copy(),
               b_enc=coder.encoder.bias.detach().cpu().numpy().copy(),
               W_dec=coder.W_dec.detach().cpu().numpy().copy(),
               b_dec=coder.b_dec.detach().cpu().numpy().copy(), k=int(coder.cfg.k),
               apply_b_dec_to_input=True, normalize_activations="none", hook_name=hook,
               model_name=model_name, metadata=extra)


def train(batches: Any, d_in: int, *, features: int, k: int, steps: int, lr: float, auxk: float,
          dead_tokens: int, multi_topk: bool, seed: int, device: str,
          report: Any = None) -> tuple[Any, dict[str, Any]]:
    """Train a sparsify ``SparseCoder`` on ``steps`` batches from ``batches`` (numpy arrays).
    Returns it and the training record (loss curve, throughput)."""
    import torch

    sparsify = import_sparsify()
    torch.manual_seed(seed)
    cfg = sparsify.SparseCoderConfig(activation="topk", num_latents=features, k=k,
                                     normalize_decoder=True, multi_topk=multi_topk)
    coder = sparsify.SparseCoder(d_in, cfg, device=device, dtype=torch.float32)
    lr = lr or 2e-4 / math.sqrt(features / 2**14)
    opt = torch.optim.Adam(coder.parameters(), lr=lr)
    warmup = max(1, min(1000, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 0
        opt, lambda s: min(1.0, (s + 1) / warmup) * min(1.0, max(0.0, (steps - s) / max(1, steps - warmup))))
    since_fired = torch.zeros(features, dtype=torch.long, device=device)
    curve: list[list[float]] = []
    every = max(1, steps // 200)
    t0 = time.perf_counter()
    t_data = 0.0
    tokens = 0
    fvu_avg = l0_avg = 0.0
    for step in range(steps):
        td = time.perf_counter()
        x = torch.from_numpy(next(batches)).to(device)
        t_data += time.perf_counter() - td
        if step == 0:
            with torch.no_grad():  # the decoder bias starts at the data's coordinate-wise median
                coder.b_dec.data = x.median(0).values.to(coder.b_dec.dtype)
        dead = since_fired > dead_tokens if auxk > 0 else None
        out = coder(x, dead_mask=dead)
        loss = out.fvu + auxk * out.auxk_loss + (out.multi_topk_fvu / 8 if multi_topk else 0)
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        coder.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            since_fired += len(x)
            since_fired[out.latent_indices.flatten()] = 0
            fvu = float(out.fvu)
            l0 = float((out.latent_acts > 0).sum(-1).float().mean())
        tokens += len(x)
        fvu_avg = fvu if step == 0 else 0.95 * fvu_avg + 0.05 * fvu
        l0_avg = l0 if step == 0 else 0.95 * l0_avg + 0.05 * l0
        if step % every == 0 or step == steps - 1:
            dead_now = int((since_fired > dead_tokens).sum())
            curve.append([step + 1, round(fvu_avg, 6), round(l0_avg, 3), dead_now])
            if report is not None:
                report(step + 1, steps, f"loss(FVU) {fvu_avg:.4f}  EV {1 - fvu_avg:.3f}  "
                                        f"L0 {l0_avg:.1f}  dead {dead_now}/{features}")
    seconds = time.perf_counter() - t0
    return coder, {"steps": steps, "tokens": tokens, "lr": lr, "warmup_steps": warmup,
                   "seconds": round(seconds, 3), "data_seconds": round(t_data, 3),
                   "tokens_per_s": round(tokens / max(seconds, 1e-9), 1), "curve": curve,
                   "dead_at_end": int((since_fired > dead_tokens).sum())}


# --- evaluation ---------------------------------------------------------------------------------


def evaluate(run: Run, sel: sae_data.Selection, sae: SAE, device: str, block_tokens: int) -> tuple[dict[str, Any], np.ndarray]:
    """Reconstruction metrics over the held-out prompts' used positions, and how many held-out
    tokens each feature fired on."""
    import torch

    w = sae.torch_weights(device)
    fires = torch.zeros(sae.d_sae, dtype=torch.long)
    sse = 0.0
    sum_x = np.zeros(sae.d_in, dtype=np.float64)
    sum_sq = 0.0
    n = 0
    l0_sum = 0.0
    for block in sae_data.blocks(sel, sel.heldout, block_tokens):
        rows = sae_data.read_block(run, sel, block)
        if not len(rows):
            continue
        with torch.inference_mode():
            x = torch.from_numpy(rows).to(device)
            acts = sae.torch_encode(x, w)
            recon = sae.torch_decode(acts, w, x)
            active = acts > 0
            fires += active.sum(0).cpu()
            l0_sum += float(active.sum())
            sse += float((recon - x).double().pow(2).sum())
        sum_x += rows.astype(np.float64).sum(0)
        sum_sq += float(np.square(rows.astype(np.float64)).sum())
        n += len(rows)
    if n == 0:
        return {"tokens": 0}, fires.numpy()
    sst = sum_sq - float(np.square(sum_x).sum()) / n
    counts = fires.numpy()
    return {"tokens": n, "mse": sse / (n * sae.d_in), "explained_variance": 1 - sse / sst if sst > 0 else None,
            "l0": l0_sum / n, "dead": int((counts == 0).sum()), "dead_share": float((counts == 0).mean()),
            "dense": int((counts > DENSE_SHARE * n).sum())}, counts


def ce_recovered(ctx: AnalysisContext, sel: sae_data.Selection, sae: SAE, n_prompts: int) -> dict[str, Any]:
    """Next-token loss on up to ``n_prompts`` held-out prompts: clean, with the hook's activation
    replaced by the SAE's reconstruction at the used positions, and with zeros there."""
    import torch

    run = ctx.run
    if run.family != "decoder":
        return {"note": f"next-token loss is for decoders (this run's model is an {run.family})"}
    try:
        model = ctx.model()
    except UserError as exc:
        return {"note": f"left out: the run's model cannot be reloaded ({str(exc).split(' (')[0]})"}
    device = str(model.device)
    w = sae.torch_weights(device)
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    count = 0
    prompts = sel.heldout[:n_prompts]
    for i in prompts:
        ids = run.tokens(i, sel.stream)
        if len(ids) < 2:
            continue
        keep = torch.from_numpy(sel.keep(run, i)).to(device)
        tokens = torch.as_tensor(np.asarray(ids, dtype=np.int64)[None], device=device)

        def splice(how: str, keep: torch.Tensor = keep) -> Any:
            def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
                x = act[0].float()
                new = sae.torch_decode(sae.torch_encode(x, w), w, x) if how == "sae" else torch.zeros_like(x)
                where = keep if sel.max_norm is None else keep & (x.norm(dim=-1) <= sel.max_norm)
                out = act.clone()
                out[0, where] = new[where].to(act.dtype)
                return out
            return fn

        for how in totals:
            hooks = [] if how == "clean" else [(sel.hook, splice(how))]
            with torch.inference_mode(), model.bridge.hooks(fwd_hooks=hooks):
                logits = model.forward(tokens)
            logp = torch.log_softmax(logits[0, :-1].float(), -1)
            totals[how] += float(-logp.gather(-1, tokens[0, 1:, None]).sum())
        count += len(ids) - 1
    if count == 0:
        return {"note": "no held-out prompt has two tokens"}
    loss = {k: v / count for k, v in totals.items()}
    span = loss["zero"] - loss["clean"]
    return {"prompts": len(prompts), "tokens": count, "loss_clean": loss["clean"], "loss_sae": loss["sae"],
            "loss_zero": loss["zero"], "ce_recovered": (loss["zero"] - loss["sae"]) / span if span else None,
            "how": "next-token loss; the hook's activation replaced at the used positions "
                   "(a skipped first position, special token or outlier row keeps its own)"}


# --- the analysis -------------------------------------------------------------------------------


def compute_sae(ctx: AnalysisContext) -> Result:
    p = ctx.params
    run = ctx.run
    sel = sae_data.select(run, p["hook"], ctx.prompts, p["holdout"], p["skip"], p["seed"])
    features = p["features"] or p["expansion"] * sel.d_in
    if not 1 <= p["k"] <= features:
        raise UserError(f"k={p['k']} must be between 1 and the number of features ({features})")
    if p["multi_topk"] and 4 * p["k"] > features:
        raise UserError(f"multi_topk uses 4k={4 * p['k']} features per token: more than there are ({features})")
    n_train = sel.n_tokens(run, sel.train)
    if n_train < 2 * p["batch"]:
        raise UserError(f"only {n_train:,} training tokens at {sel.hook}: fewer than two batches of "
                        f"{p['batch']:,} (lower sae.batch)")
    buffer = min(p["buffer"], max(2 * p["batch"], n_train))
    tokens = p["tokens"] or n_train
    steps = max(1, tokens // p["batch"])
    device = device_of(p["device"])
    rng = np.random.default_rng(p["seed"])
    block_tokens = max(p["batch"], buffer // 8)
    source = sae_data.row_stream(run, sel, sel.train, rng, block_tokens)
    batches = sae_data.shuffled_batches(source, sel.d_in, buffer, p["batch"], rng)
    dead_tokens = p["dead_tokens"] or min(10_000_000, max(p["batch"] * 10, tokens // 4))
    coder, record = train(batches, sel.d_in, features=features, k=p["k"], steps=steps, lr=p["lr"],
                          auxk=p["auxk"], dead_tokens=dead_tokens, multi_topk=p["multi_topk"],
                          seed=p["seed"], device=device, report=ctx.progress)
    meta = {"workbench_run": run.final_path.name, "workbench_run_id": run.run_id,
            "trained_with": library_version(), "context_size": None,
            "prepend_bos": run.capture_settings.bos == "prepend"}
    sae = to_sae(coder, sel.hook, run.model_name, meta)
    held, fires = evaluate(run, sel, sae, device, block_tokens)
    if not p["ce"]:
        ce: dict[str, Any] = {"note": "not asked (ce=false)"}
    elif not sel.heldout:
        ce = {"note": "no held-out prompts (holdout=0)"}
    else:
        try:
            ce = ce_recovered(ctx, sel, sae, p["ce_prompts"])
        except Exception as exc:  # noqa: BLE001 - the trained SAE is kept; the note says what failed
            ce = {"note": f"left out: {type(exc).__name__}: {exc}".splitlines()[0]}
    cfg_raw, weights_raw = sae.to_bytes()
    data = {
        "hook": sel.hook, "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k,
        "library": library_version(), "device": device,
        "prompts": {"train": len(sel.train), "heldout": len(sel.heldout)},
        "tokens": {"train_available": n_train, "trained": record["tokens"], "heldout": held.get("tokens", 0)},
        "skipped": {"first_position": sel.skip_first, "special_tokens": sel.skip_special,
                    "norm_above": sel.max_norm, "sink_ratio": sel.sink_ratio},
        "buffer": {"tokens": buffer, "mb": round(buffer * sel.d_in * 4 / 1e6, 2), "block_tokens": block_tokens},
        "training": {k: v for k, v in record.items() if k != "curve"} | {"dead_tokens": dead_tokens,
                                                                          "auxk": p["auxk"], "batch": p["batch"]},
        "heldout": held, "ce": ce, "peak_rss_mb": round(peak_rss_mb(), 1),
        "saelens_cfg": sae.cfg(),
    }
    curve = np.asarray(record["curve"], dtype=np.float64).reshape(-1, 4)
    return Result(data=data, arrays={"sae_cfg_json": np.frombuffer(cfg_raw, dtype=np.uint8),
                                     "sae_weights": np.frombuffer(weights_raw, dtype=np.uint8),
                                     "heldout_fires": fires.astype(np.int64), "curve": curve})


def render_sae(result: Result) -> str:
    d = result.data
    tr, held, ce = d["training"], d["heldout"], d["ce"]
    lines = [f"{d['architecture']} SAE on {d['hook']}: {d['d_in']} -> {d['d_sae']} features, k={d['k']}  "
             f"({d['library']}, {d['device']})",
             f"trained on {d['tokens']['trained']:,} tokens ({tr['steps']:,} steps of {tr['batch']:,}; "
             f"{d['prompts']['train']:,} prompts, {d['tokens']['train_available']:,} tokens available) in "
             f"{tr['seconds']:.1f} s: {tr['tokens_per_s']:,.0f} tokens/s, lr {tr['lr']:.2e}",
             f"buffer {d['buffer']['tokens']:,} tokens ({d['buffer']['mb']} MB); peak RSS {d['peak_rss_mb']:,.0f} MB",
             "skipped: " + ", ".join(n for n, on in (("first position", d["skipped"]["first_position"]),
                                                     ("special tokens", d["skipped"]["special_tokens"])) if on)
             + (f", rows of norm above {d['skipped']['norm_above']:,.0f}" if d["skipped"].get("norm_above") else "")
             + (f" (first position's norm {d['skipped']['sink_ratio']:.1f}x the others')"
                if d["skipped"].get("sink_ratio") else "")]
    if held.get("tokens"):
        ev = held["explained_variance"]
        lines.append(f"held out ({d['prompts']['heldout']:,} prompts, {held['tokens']:,} tokens): "
                     f"MSE {held['mse']:.4g}, explained variance {'n/a' if ev is None else f'{ev:.3f}'}, "
                     f"L0 {held['l0']:.1f}, "
                     f"dead {held['dead']:,} ({held['dead_share']:.1%}), dense {held['dense']:,}")
    if "ce_recovered" in ce:
        lines.append(f"next-token loss on {ce['prompts']} held-out prompts: clean {ce['loss_clean']:.3f}, "
                     f"SAE {ce['loss_sae']:.3f}, zero {ce['loss_zero']:.3f}: CE recovered "
                     + (f"{ce['ce_recovered']:.1%}" if ce["ce_recovered"] is not None else "n/a"))
    else:
        lines.append(f"CE recovered: {ce.get('note', 'n/a')}")
    lines.append("the SAE (SAELens folder format) is stored in this result: 'workbench sae-export RUN DIR'")
    return "\n".join(lines)


# --- finding a stored SAE -----------------------------------------------------------------------


def stored_sae(stored: StoredResult) -> SAE:
    """The SAE a stored ``sae`` result holds."""
    arrays = stored.arrays
    return from_bytes(arrays["sae_cfg_json"].tobytes(), arrays["sae_weights"].tobytes(), str(stored.path))


def sae_results(run: Run) -> list[StoredResult]:
    from workbench.store.results import list_results

    return [r for r in list_results(run) if r.analysis == "sae" and r.ok and r.computed_on(run)]


def locate_sae(run: Run, spec: str) -> Path | StoredResult:
    """Where the SAE ``spec`` names is, without reading its weights: a SAELens folder, or the
    stored ``sae`` result (empty: the newest trained on this run; a hook name: the newest on it; a
    result key or its first digits)."""
    spec = spec.strip()
    path = Path(spec).expanduser() if spec else None
    if path is not None and (path.exists() or "/" in spec or spec.startswith(".")):
        if not path.exists():
            raise UserError(f"{path}: no such SAE folder")
        if not path.is_dir():
            raise UserError(f"{path}: not a folder (an SAE is a SAELens folder with cfg.json and "
                            "sae_weights.safetensors)")
        return path
    found = sae_results(run)
    if spec:
        by_hook = [r for r in found if r.data.get("hook") == spec]
        by_key = [r for r in found if r.meta.get("key", "").startswith(spec)]
        if not by_hook and len(by_key) > 1:
            keys = ", ".join(str(r.meta.get("key")) for r in by_key)
            raise UserError(f"{spec!r} starts the keys of {len(by_key)} SAEs ({keys}): give more of it")
        found = by_hook or by_key
    if not found:
        what = f" matching {spec!r}" if spec else ""
        raise UserError(f"no SAE{what} trained on {run.final_path.name} (train one: workbench analyze "
                        f"{run.final_path.name} sae --param sae.hook=NAME; or give a SAELens folder)")
    return found[0]


def sae_identity(run: Run, spec: str) -> dict[str, Any]:
    """The identity of the SAE ``spec`` names now (a result's key, or a folder's files' SHA-256),
    which joins the key of results computed with it: a newer SAE is not answered with a result of
    the old one."""
    import hashlib

    where = locate_sae(run, spec)
    if isinstance(where, Path):
        digest = hashlib.sha256()
        for name in ("cfg.json", "sae_weights.safetensors"):
            f = where / name
            digest.update(f.read_bytes() if f.is_file() else b"")
        return {"sae": f"folder sha256 {digest.hexdigest()[:16]}"}
    return {"sae": f"result {where.meta.get('key')} {where.meta.get('created')} "
                   f"{where.path.stat().st_mtime_ns}"}


def find_sae(run: Run, spec: str) -> tuple[SAE, str]:
    """The SAE ``spec`` names (:func:`locate_sae`), loaded, and where it came from."""
    where = locate_sae(run, spec)
    if isinstance(where, Path):
        return load_folder(where), str(where)
    return stored_sae(where), f"sae result {where.meta.get('key')} ({where.data.get('hook')})"


SAE_PARAM = Param("sae", str, "", "the SAE: empty (newest trained on this run), a hook name, a result key, "
                  "or a SAELens folder")
"""How analyses that use an SAE name it (:func:`find_sae`; :func:`sae_identity` keys their results)."""


SAE_ANALYSIS = Analysis(
    name="sae", version="3",
    description="Train a TopK sparse autoencoder on one hook, streamed from the run; held-out MSE, "
                "explained variance, L0, dead features, CE recovered",
    compute=compute_sae, auto=False, may_use_model=True, families=("decoder", "encoder", "encoder-decoder"),
    params=(
        Param("hook", str, "", "the hook to train on (a per-token vector: residual stream, MLP or "
              "attention output)"),
        Param("features", int, 0, "number of features (0: expansion x d_in)", min=0),
        Param("expansion", int, 8, "features per input dimension when features=0", min=1),
        Param("k", int, 32, "features active per token (TopK)", min=1),
        Param("tokens", int, 0, "training tokens (0: as many as the training tokens, about one pass)", min=0),
        Param("batch", int, 1024, "tokens per step", min=1),
        Param("lr", float, 0.0, "learning rate (0: sparsify's 2e-4 / sqrt(features / 2^14))", min=0),
        Param("auxk", float, 1 / 32, "weight of the AuxK loss that revives dead features", min=0),
        Param("dead_tokens", int, 0, "a feature silent this many tokens is dead for AuxK (0: a quarter "
              "of training, at most 10M)", min=0),
        Param("multi_topk", bool, False, "add sparsify's Multi-TopK loss"),
        Param("buffer", int, 65536, "shuffling buffer in tokens (memory: buffer x d_in x 4 bytes)", min=2),
        Param("holdout", float, 0.1, "share of prompts held out for the metrics", min=0, max=0.9),
        Param("skip", str, "auto", ("positions left out: auto (a decoder's first position, special "
                                    "tokens, rows of norm > 3x the median), first, special, none"),
              choices=sae_data.SKIP_CHOICES),
        Param("ce", bool, True, "next-token loss with the reconstruction spliced in (reloads the model)"),
        Param("ce_prompts", int, 64, "held-out prompts for the next-token loss", min=1),
        Param("seed", int, 0, "seed for the split, the shuffling and the initialisation"),
        Param("device", str, "auto", "cpu, cuda, cuda:N or auto"),
    ),
    render_text=render_sae,
)


@hookimpl
def register_analyses(register):  # type: ignore[no-untyped-def]
    register(SAE_ANALYSIS)


@hookimpl
def register_commands(cli):  # type: ignore[no-untyped-def]
    import click

    @cli.command("sae-export")
    @click.argument("run_path", metavar="RUN")
    @click.argument("out", metavar="DIR")
    @click.option("--sae", "spec", default="", metavar="SPEC",
                  help="Which SAE: a hook name or result key (default: the newest trained on RUN).")
    @click.option("--force", is_flag=True, help="Replace an SAE already in DIR.")
    def sae_export(run_path: str, out: str, spec: str, force: bool) -> None:
        """Write an SAE trained on RUN (a stored 'sae' result) as a SAELens folder DIR: cfg.json and
        sae_weights.safetensors, loadable by SAELens' SAE.load_from_disk and by features.sae=DIR."""
        from workbench.store import open_run

        with open_run(run_path) as run:
            sae, where = find_sae(run, spec)
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"{folder} is a file; give a folder to write the SAE into")
        if (folder / "cfg.json").exists() and not force:
            raise UserError(f"{folder} already holds an SAE (cfg.json); --force replaces it")
        sae.save(folder)
        click.echo(f"wrote {folder}/cfg.json and {folder}/sae_weights.safetensors: {sae.describe()} (from {where})")
