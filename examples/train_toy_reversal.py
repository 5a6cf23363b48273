"""Train ``toy-reversal``: a small T5 encoder-decoder that reverses a sequence of letters.

Input ``"a q x"`` → output ``"x q a"``. To write output token j of an n-token input the decoder
must read input position n - 1 - j, so its cross-attention has a known alignment: the
``head-roles`` / ``attends-to`` analyses must find it (tests/test_attention.py checks it).

    python examples/train_toy_reversal.py                # writes plugins/toys/reversal/
    python examples/train_toy_reversal.py --out DIR --steps 3000

Seeded: the same arguments give the same weights (on the same torch build; CPU). A few minutes on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration
from workbench_plugins.toy_models import FIRST_LETTER, TOYS, VOCAB, make_tokenizer

PAD, EOS = VOCAB["<pad>"], VOCAB["<eos>"]


def batch(gen: torch.Generator, size: int, lo: int, hi: int) -> tuple[torch.Tensor, ...]:
    """Inputs (letters + <eos>, padded), decoder inputs (<pad> start + target) and labels
    (reversed letters + <eos>, -100 on padding)."""
    n = torch.randint(lo, hi + 1, (size,), generator=gen)
    width = int(n.max()) + 1
    enc = torch.full((size, width), PAD)
    labels = torch.full((size, width), -100)
    for i, k in enumerate(n.tolist()):
        x = torch.randint(FIRST_LETTER, len(VOCAB), (k,), generator=gen)
        enc[i, :k], enc[i, k] = x, EOS
        labels[i, :k], labels[i, k] = x.flip(0), EOS
    dec = torch.full_like(labels, PAD)
    dec[:, 1:] = labels[:, :-1].clamp(min=PAD)
    return enc, (enc != PAD).long(), dec, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=TOYS / "reversal")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-len", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=12)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    config = T5Config(vocab_size=len(VOCAB), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                      num_decoder_layers=2, num_heads=4, dropout_rate=0.0, pad_token_id=PAD,
                      eos_token_id=EOS, decoder_start_token_id=PAD, tie_word_embeddings=False,
                      architectures=["T5ForConditionalGeneration"])
    config._attn_implementation = "eager"
    model = T5ForConditionalGeneration(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    model.train()
    for step in range(args.steps):
        enc, mask, dec, labels = batch(gen, 64, args.min_len, args.max_len)
        loss = model(input_ids=enc, attention_mask=mask, decoder_input_ids=dec, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f} s", flush=True)
    model.eval()
    enc, mask, dec, labels = batch(torch.Generator().manual_seed(12345), 512, args.min_len, args.max_len)
    with torch.no_grad():
        logits = model(input_ids=enc, attention_mask=mask, decoder_input_ids=dec).logits
    ok = (logits.argmax(-1) == labels) | (labels == -100)
    accuracy = float(ok.all(1).float().mean())
    print(f"held-out sequences reversed exactly (teacher forcing): {accuracy:.1%}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), safe_serialization=True)
    make_tokenizer("t5").save_pretrained(str(args.out))
    (args.out / "training.json").write_text(json.dumps({
        "script": "examples/train_toy_reversal.py", "seed": args.seed, "steps": args.steps,
        "lengths": [args.min_len, args.max_len], "heldout_exact": accuracy,
        "summary": f"{args.steps} steps, seed {args.seed}, held-out exact {accuracy:.1%}",
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
