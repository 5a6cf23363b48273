"""Train ``toy-induction``: a 2-layer attention-only decoder that forms an induction head.

Built with TransformerLens' native architecture (``TransformerBridge.boot_native``, attention
only) and trained with AdamW on sequences of 48 random letters in which a segment of 8-24 letters
is repeated at a random place. The first copy is unpredictable
(ln 52 = 3.95 nats a token); the second is predictable only by looking back at what followed the
same letter before: a previous-token head in layer 0 and an induction head in layer 1.

    python examples/train_toy_induction.py               # writes plugins/toys/induction/
    python examples/train_toy_induction.py --out DIR --steps 8000 --heads 2

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=TOYS / "induction")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--heads", type=int, default=2, help="heads per layer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    config = {"d_model": 64, "d_head": 64 // args.heads, "n_heads": args.heads, "n_layers": 2,
              "n_ctx": 64, "d_vocab": len(VOCAB), "attn_only": True, "normalization_type": "LN",
              "positional_embedding_type": "standard", "seed": args.seed, "init_weights": True}
    torch.set_num_threads(1)  # reproducible sums
    bridge = TransformerBridge.boot_native(TransformerBridgeConfig.from_dict(config))
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(bridge.parameters(), lr=1e-3, weight_decay=0.01)
    batch_size = 32
    start = time.time()
    for step in range(args.steps):
        loss = bridge(batch(gen, batch_size), return_type="loss")
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f} s", flush=True)
    bridge.eval()
    scores = evaluate(bridge)
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


if __name__ == "__main__":
    main()
