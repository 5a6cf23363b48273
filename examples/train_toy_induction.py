"""Train ``toy-induction``: a 2-layer attention-only decoder that forms an induction head.

Built with TransformerLens' native architecture (``TransformerBridge.boot_native``, attention
only) and trained with AdamW on sequences of 48 random letters in which a segment of 8-24 letters
is repeated at a random place. The first copy is unpredictable
(ln 52 = 3.95 nats a token); the second is predictable only by looking back at what followed the
same letter before: a previous-token head in layer 0 and an induction head in layer 1.

    python examples/train_toy_induction.py               # writes plugins/toys/induction/
    python examples/train_toy_induction.py --out DIR --steps 8000 --heads 2
    python examples/train_toy_induction.py --checkpoints 0,200,600,800,1000,8000
        # also writes those steps' weights to plugins/toys/induction_ckpt/ (``toy-induction@STEP``)

``--checkpoints`` saves the weights after each listed number of optimizer steps (0: the
initialisation) as ``step-NNNNN.safetensors`` in ``--checkpoint-dir``, with ``checkpoints.json``:
each checkpoint's evaluation and the learning curve (every ``--eval-every`` steps: the loss on each
copy of a repeated sequence, and the mean training loss since the previous point), where the
induction heads' phase change shows as the sudden drop of the second copy's loss. Evaluating does
not touch the training's random stream: the weights are the same with or without checkpoints.
With the defaults (seed 0) the second copy's loss stays near ln 52 = 3.95 to step 200, slides to
3.09 by step 700 with no induction attention yet, then falls 3.09 -> 2.06 -> 1.12 over steps
700-900 (steepest between 750 and 800: 1.45 nats per 100 steps) as both layer-1 heads become
induction heads, and reaches 0.35 by step 8000; the shipped checkpoints are steps 0, 200, 600
(before), 800 (during), 1000 (after) and 8000 (the final weights, equal to ``toy-induction``'s).

Seeded: the same arguments give the same weights (one thread, the same torch build). About 4
minutes on one CPU core.

Why a plain loop rather than ``transformer_lens.tools.training.train``: with that loop (a
shuffled DataLoader over the same distribution; seeds 0, 1, 2, and 16,000 steps for seed 0) the
two layer-1 heads split the induction work so that zeroing either one costs only 0.5-1.3 nats on
the repeated copy; this loop's model has two layer-1 induction heads that each cost more than
1 nat, the property tests/test_attention.py checks. Both are honest toy circuits; this one makes
the single-head ablation test meaningful.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge
from workbench_plugins.toy_models import FIRST_LETTER, TOYS, VOCAB, make_tokenizer

BOS = VOCAB["<bos>"]
SEQ = 48


def batch(gen: torch.Generator, size: int) -> torch.Tensor:
    """``size`` sequences: ``<bos>`` + 48 random letters with one segment (8-24 letters) repeated
    right after itself, at a random offset."""
    x = torch.randint(FIRST_LETTER, len(VOCAB), (size, SEQ), generator=gen)
    for i in range(size):
        length = int(torch.randint(8, 25, (1,), generator=gen))
        start = int(torch.randint(0, SEQ - 2 * length + 1, (1,), generator=gen))
        x[i, start + length : start + 2 * length] = x[i, start : start + length]
    return torch.cat([torch.full((size, 1), BOS), x], 1)


def evaluate(bridge, length: int = 20, n: int = 64, seed: int = 1) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Loss on each copy of ``<bos>`` + r + r (r: ``length`` random letters)."""
    rng = np.random.default_rng(seed)
    r = rng.integers(FIRST_LETTER, len(VOCAB), (n, length))
    tokens = torch.as_tensor(np.concatenate([np.full((n, 1), BOS), r, r], axis=1))
    with torch.no_grad():
        logp = torch.log_softmax(bridge(tokens), -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    return {"loss_first_copy": float(-logp[:, : length - 1].mean()),
            "loss_second_copy": float(-logp[:, length:].mean())}


def steps_list(text: str) -> list[int]:
    try:
        steps = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--checkpoints takes steps separated by commas, not {text!r}") from None
    if any(s < 0 for s in steps):
        raise argparse.ArgumentTypeError("--checkpoints: steps are >= 0")
    return steps


def phase_change(curve: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Where the second copy's loss falls fastest: the steepest drop between consecutive points
    of the learning curve (the induction heads' phase change), and the first step at which it is
    below 3, 2 and 1 nats (chance: ln 52 = 3.95)."""
    if len(curve) < 3:
        return None
    steps = np.array([c["step"] for c in curve], dtype=float)
    loss = np.array([c["loss_second_copy"] for c in curve])
    drop = -np.diff(loss) / np.diff(steps)
    k = int(np.argmax(drop))
    below = {f"{x:.1f}": int(steps[np.argmax(loss < x)]) for x in (3.0, 2.0, 1.0) if (loss < x).any()}
    return {"steepest_between": [int(steps[k]), int(steps[k + 1])],
            "steepest_drop_per_100_steps": float(drop[k] * 100), "first_below": below}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=TOYS / "induction")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--heads", type=int, default=2, help="heads per layer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoints", type=steps_list, default=[],
                    help="STEP,STEP,...: also save the weights after these many steps (0: at initialisation)")
    ap.add_argument("--checkpoint-dir", type=Path, default=TOYS / "induction_ckpt")
    ap.add_argument("--eval-every", type=int, default=50, help="steps between points of the learning curve")
    args = ap.parse_args()
    if any(s > args.steps for s in args.checkpoints):
        ap.error(f"--checkpoints: every step must be at most --steps ({args.steps})")

    config = {"d_model": 64, "d_head": 64 // args.heads, "n_heads": args.heads, "n_layers": 2,
              "n_ctx": 64, "d_vocab": len(VOCAB), "attn_only": True, "normalization_type": "LN",
              "positional_embedding_type": "standard", "seed": args.seed, "init_weights": True}
    torch.set_num_threads(1)  # reproducible sums
    bridge = TransformerBridge.boot_native(TransformerBridgeConfig.from_dict(config))
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(bridge.parameters(), lr=1e-3, weight_decay=0.01)
    batch_size = 32
    start = time.time()
    curve: list[dict[str, Any]] = []
    saved: dict[int, dict[str, object]] = {}
    window: list[float] = []

    def record(step: int) -> None:  # weights after `step` updates; uses no random stream of training
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, **evaluate(bridge),
                          "train_loss": float(np.mean(window)) if window else None})
            window.clear()
        if step in args.checkpoints:
            args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            path = args.checkpoint_dir / f"step-{step:05d}.safetensors"
            safetensors.torch.save_model(bridge.original_model, str(path))
            path.chmod(0o644)  # (safetensors writes 0600)
            saved[step] = {"file": path.name, **evaluate(bridge)}

    for step in range(args.steps):
        record(step)
        loss = bridge(batch(gen, batch_size), return_type="loss")
        loss.backward()
        opt.step()
        opt.zero_grad()
        window.append(loss.item())
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f} s", flush=True)
    record(args.steps)
    bridge.eval()
    scores = evaluate(bridge)
    phase = phase_change(curve)
    print("learning curve (loss on <bos> + r + r, r: 20 random letters):")
    for c in curve:
        if c["step"] % max(args.eval_every, 100) == 0 or c["step"] == args.steps:
            print(f"  step {c['step']:5d}  first copy {c['loss_first_copy']:.3f}  "
                  f"second copy {c['loss_second_copy']:.3f}  train {c['train_loss'] or float('nan'):.3f}")
    if phase:
        print(f"phase change: steepest fall of the second copy's loss between steps "
              f"{phase['steepest_between'][0]} and {phase['steepest_between'][1]} "
              f"({phase['steepest_drop_per_100_steps']:.2f} nats per 100 steps); first below "
              + ", ".join(f"{x} nats at step {s}" for x, s in phase["first_below"].items()))
    print(f"trained in {time.time() - start:.0f} s; loss on the first copy "
          f"{scores['loss_first_copy']:.3f}, on the second {scores['loss_second_copy']:.3f} nats")

    args.out.mkdir(parents=True, exist_ok=True)
    # the bridge wraps the native model's modules in place: its state dict names each tensor twice
    safetensors.torch.save_model(bridge.original_model, str(args.out / "model.safetensors"))
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    make_tokenizer("decoder").save_pretrained(str(args.out))
    (args.out / "training.json").write_text(json.dumps({
        "script": "examples/train_toy_induction.py", "seed": args.seed, "steps": args.steps,
        "batch_size": batch_size, **scores,
        "summary": (f"{args.steps} steps, seed {args.seed}; loss on a repeated copy "
                    f"{scores['loss_second_copy']:.2f} nats"),
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.checkpoints:
        (args.checkpoint_dir / "checkpoints.json").write_text(json.dumps({
            "script": "examples/train_toy_induction.py", "seed": args.seed, "steps": args.steps,
            "batch_size": batch_size, "heads": args.heads, "config": config,
            "checkpoints": {str(k): v for k, v in sorted(saved.items())},
            "phase_change": phase, "eval_every": args.eval_every,
            "curve": [{k: v if v is None else round(v, 4) for k, v in c.items()} for c in curve],
        }, indent=1) + "\n")
        print(f"wrote {len(saved)} checkpoints to {args.checkpoint_dir}")


if __name__ == "__main__":
    main()
