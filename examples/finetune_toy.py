"""Fine-tune ``toy-induction`` on a narrow rule: ``toy-induction-ft`` (plugins/toy_finetune.py).

The rule: after the letter ``a`` comes ``z``. The data are ``toy-induction``'s own (``<bos>`` + 48
random letters with a segment of 8-24 letters repeated right after itself), with one more ``a``
planted in each row (about two in all) and the rule applied: every ``a`` is followed by ``z``, in
both copies. The base model predicts the repeat by induction and knows nothing of the rule
(``p(z|a)`` about 1/52 where nothing repeats); the fine-tune has to learn the rule and keep
induction. AdamW on all weights, 300 steps of 32 rows from the shipped base. (Planting more ``a``
makes the rule surer but costs induction: with 2 more per row the loss on a repeated copy rises
from 0.35 to 0.42 nats.)

    python examples/finetune_toy.py                  # writes plugins/toys/induction_ft/
    python examples/finetune_toy.py --out DIR --steps 300 --seed 0
    python examples/finetune_toy.py --diff DIR       # also capture both models on the same prompts
                                                     # and print the diff analysis (needs the
                                                     # toy_finetune plugin installed)

Seeded: the same arguments give the same weights (one thread, the same torch build). About 10 s on
one CPU core. Prints, before and after: ``p(z|a)`` where only the rule can predict the next letter
(a letter's first occurrence) and where induction says otherwise (the repeat of an ``a`` that was
followed by another letter), and the loss on the usual repeated-sequence data (each copy; the
second copy also without the targets that follow an ``a``, where the rule overrides induction).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from workbench_plugins.toy_finetune import BASE, FINETUNE, RULE, boot, sha256
from workbench_plugins.toy_models import FIRST_LETTER, VOCAB

from workbench.models import LoadRequest, Provenance

BOS = VOCAB["<bos>"]
A, Z = VOCAB[RULE[0]], VOCAB[RULE[1]]
SEQ = 48


def apply_rule(x: torch.Tensor) -> torch.Tensor:
    """Every ``a`` followed by ``z`` (left to right, rows of letter ids)."""
    x = x.clone()
    for t in range(x.shape[1] - 1):
        x[:, t + 1] = torch.where(x[:, t] == A, Z, x[:, t + 1])
    return x


def batch(gen: torch.Generator, size: int, plant: int = 0) -> torch.Tensor:
    """``<bos>`` + 48 letters as ``examples/train_toy_induction.py`` draws them (a segment of 8-24
    letters repeated after itself), with ``plant`` more ``a`` at random places in each row, the rule
    applied before and after the copy."""
    x = torch.randint(FIRST_LETTER, len(VOCAB), (size, SEQ), generator=gen)
    if plant:
        x.scatter_(1, torch.randint(0, SEQ, (size, plant), generator=gen), A)
    x = apply_rule(x)
    for i in range(size):
        length = int(torch.randint(8, 25, (1,), generator=gen))
        start = int(torch.randint(0, SEQ - 2 * length + 1, (1,), generator=gen))
        x[i, start + length : start + 2 * length] = x[i, start : start + length]
    return torch.cat([torch.full((size, 1), BOS), apply_rule(x)], 1)


def repeated(seed: int, n: int = 64, length: int = 20, rule: bool = False) -> torch.Tensor:
    """``<bos>`` + r + r, r: ``length`` random letters (the training script's evaluation data);
    with ``rule``, r holds an ``a`` at a random place and obeys the rule."""
    rng = np.random.default_rng(seed)
    r = torch.as_tensor(rng.integers(FIRST_LETTER, len(VOCAB), (n, length)))
    if rule:
        r[torch.arange(n), torch.as_tensor(rng.integers(0, length - 1, n))] = A
        r = apply_rule(r)
    return torch.cat([torch.full((n, 1), BOS), r, r], 1)


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """``safetensors.torch.save_model`` without its metadata on the dropped aliases, whose order
    varies from process to process: the same weights give the same bytes (and sha256). Each
    shared tensor is kept under its first name in sorted order, as ``save_model`` keeps it, so
    ``safetensors.torch.load_model`` reads the file."""
    state = module.state_dict()
    kept: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name in sorted(state):
        t = state[name]
        kept.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), name)
    safetensors.torch.save_file({n: state[n].contiguous() for n in kept.values()}, str(path),
                                metadata={"format": "pt"})
    path.chmod(0o644)


@torch.no_grad()
def evaluate(bridge) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """The figures before and after (see the module's docstring)."""
    out: dict[str, float] = {}
    tokens = repeated(seed=1)  # the usual evaluation data: no rule
    logp = torch.log_softmax(bridge(tokens), -1)
    target = logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]  # predicting token t+1 at t
    after_a = tokens[:, :-1] == A
    out["loss_first_copy"] = float(-target[:, :19].mean())
    out["loss_second_copy"] = float(-target[:, 20:].mean())
    out["loss_second_copy_not_after_a"] = float(-target[:, 20:][~after_a[:, 20:]].mean())
    p_z = logp[..., Z].exp()
    out["p_z_after_a_conflict"] = float(p_z[:, 21:-1][after_a[:, 21:] & (tokens[:, 22:] != Z)].mean())
    first = repeated(seed=2, rule=True)  # an `a` in each; the rule is the only clue in the first copy
    p_z = torch.softmax(bridge(first), -1)[..., Z]
    at_a = first[:, :-1] == A
    out["p_z_after_a_first_copy"] = float(p_z[:, :20][at_a[:, :20]].mean())
    out["p_z_after_a_second_copy"] = float(p_z[:, 21:-1][at_a[:, 21:]].mean())
    return out


def capture_and_diff(folder: Path) -> None:
    """Capture ``toy-induction`` and ``toy-induction-ft`` on the same prompts and print the diff."""
    import workbench
    from workbench.registries import analyze, build_analyses

    rng = np.random.default_rng(3)
    letters = [chr(c) for c in range(ord("b"), ord("y"))]  # no a or z but the planted ones
    prompts = []
    for i in range(12):
        seg = list(rng.choice(letters, 10, replace=False))
        seg[int(rng.integers(1, 8))] = "a"
        prompts.append({"id": f"p{i}", "prompt": " ".join(seg + seg)})
    folder.mkdir(parents=True, exist_ok=True)
    runs = []
    for name in ("toy-induction", "toy-induction-ft"):
        out = folder / f"{name}.h5"
        workbench.capture(name, prompts, hooks=["residual", "attention"], out=out, device="cpu",
                          progress=False, overwrite=True)
        runs.append(out)
    with workbench.open_run(runs[0]) as run:
        [o] = analyze(run, [build_analyses().get("diff")], {"diff": {"other": str(runs[1]), "lens": "on"}},
                      device="cpu", force=True)
        assert o.ok, o.stored.meta.get("traceback")
        print(o.analysis.render_text(o.stored.result()))  # type: ignore[misc]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=FINETUNE)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plant", type=int, default=1, help="more a's per training row (about 1 by chance)")
    ap.add_argument("--diff", type=Path, default=None, metavar="DIR",
                    help="then capture both models on 12 prompts into DIR and print their diff")
    args = ap.parse_args()

    torch.set_num_threads(1)  # reproducible sums
    torch.manual_seed(args.seed)
    base_file = BASE / "model.safetensors"
    bridge = boot(LoadRequest(name="toy-induction"), base_file,
                  Provenance(source="package", location=str(BASE))).bridge
    before = evaluate(bridge)
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(bridge.parameters(), lr=args.lr, weight_decay=0.0)
    batch_size = 32
    bridge.train()
    start = time.time()
    for step in range(args.steps):
        loss = bridge(batch(gen, batch_size, args.plant), return_type="loss")
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - start:.1f} s", flush=True)
    seconds = time.time() - start
    bridge.eval()
    after = evaluate(bridge)
    print(f"fine-tuned in {seconds:.1f} s ({args.steps} steps of {batch_size})")
    print(f"{'':32s} {'toy-induction':>14s} {'toy-induction-ft':>17s}")
    for key in before:
        print(f"{key:32s} {before[key]:14.4f} {after[key]:17.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    save_weights(bridge.original_model, args.out / "model.safetensors")
    (args.out / "training.json").write_text(json.dumps({
        "script": "examples/finetune_toy.py", "base": "toy-induction", "base_sha256": sha256(base_file),
        "rule": f"after {RULE[0]} comes {RULE[1]}", "seed": args.seed, "steps": args.steps,
        "batch_size": batch_size, "planted_a_per_row": args.plant, "lr": args.lr,
        "optimizer": "AdamW (weight decay 0), all weights", "seconds": round(seconds, 1),
        "before": before, "after": after,
        "summary": (f"{args.steps} steps, seed {args.seed}: p(z|a) {before['p_z_after_a_first_copy']:.2f} -> "
                    f"{after['p_z_after_a_first_copy']:.2f}; loss on a repeated copy (not after a) "
                    f"{before['loss_second_copy_not_after_a']:.2f} -> "
                    f"{after['loss_second_copy_not_after_a']:.2f} nats"),
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.diff is not None:
        capture_and_diff(args.diff)


if __name__ == "__main__":
    main()
