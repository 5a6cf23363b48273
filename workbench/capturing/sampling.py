"""Sampling: from logits to a sampled token (softmax with temperature, top-k and top-p (nucleus)
truncation), and the one generation loop (:func:`generate`) that ``capture --generate`` and the
steering analysis both run.

Computed in float64 so that entropies and probabilities of near-certain tokens are not rounded
away. A temperature of 0 means greedy decoding: the distribution puts all mass on the argmax.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from workbench.errors import UserError

if TYPE_CHECKING:
    from workbench.models.model import Model


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UserError("temperature must be a finite number >= 0 (0 means greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise UserError("sampling top-k must be at least 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError("top-p must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sampling_distribution(logits: Any, settings: SamplingSettings) -> Any:
    """The distribution a token is drawn from, ``(vocab,)`` float64 summing to 1.

    Order of operations (as in Hugging Face's samplers): divide the logits by the temperature,
    keep the ``top_k`` largest, keep the smallest set of most likely tokens whose probability
    reaches ``top_p`` (always at least one), renormalise.
    """
    import torch

    x = logits.detach().to(torch.float64).flatten()
    if settings.temperature == 0:
        probs = torch.zeros_like(x)
        probs[int(torch.argmax(x))] = 1.0
        return probs
    x = x / settings.temperature
    if settings.top_k is not None and settings.top_k < x.numel():
        kth = torch.topk(x, settings.top_k).values[-1]
        x = torch.where(x >= kth, x, torch.full_like(x, -math.inf))
    probs = torch.softmax(x, dim=-1)
    if settings.top_p is not None and settings.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_p, dim=0)
        # keep a token if the mass before it is still below top_p (so the first is always kept)
        keep_sorted = (cumulative - sorted_p) < settings.top_p
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[keep_sorted]] = True
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return probs


def entropy(probs: Any) -> float:
    """Shannon entropy in nats of a probability vector (zeros contribute nothing)."""
    import torch

    p = probs[probs > 0]
    return float(-(p * torch.log(p)).sum())


@dataclass(frozen=True)
class Generation:
    """``--generate N``: sample N tokens after each prompt before capturing."""

    n: int
    sampling: SamplingSettings
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "seed": self.seed, **self.sampling.to_dict()}


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index``'s random stream in a capture seeded with ``seed``: independent
    of batching and of resuming."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


def padded(seqs: list[list[int]], pad: int, device: str) -> tuple[Any, Any]:
    """Right-padded ``(batch, longest)`` token ids and the matching attention mask (1 = real)."""
    import torch

    n_max = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), n_max), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n_max), dtype=torch.long)
    for row, s in enumerate(seqs):
        tokens[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return tokens.to(device), mask.to(device)


def generate(model: Model, prompts: list[list[int]], n: int, settings: SamplingSettings,
             seeds: list[int], *, pad: int = 0, fwd_hooks: list[tuple[str, Any]] | None = None,
             stop_token: int | None = None) -> tuple[list[list[int]], list[dict[str, list[float]]]]:
    """Sample up to ``n`` tokens after each of ``prompts`` (token ids; a decoder). Returns each
    whole sequence (prompt and sampled tokens) and, per row, each step's statistics (the names of
    :data:`~workbench.store.schema.GEN_FIELDS`: the chosen token's probability under the sampling
    distribution and under the model, and both distributions' entropies).

    Every step reruns the whole sequence (no key-value cache): the numerics are those of a plain
    forward pass, with ``fwd_hooks`` (``(hook name, function)``, e.g. a steering vector) active
    throughout. Row ``r`` draws from its own ``torch.Generator`` seeded with ``seeds[r]``. Rows
    are right-padded and each row's next token is read at its own last real position (causal:
    padding after it is never seen), so a batch generates exactly what each prompt would alone,
    up to rounding. A row stops early once it samples ``stop_token``."""
    import torch

    from workbench.store.schema import GEN_FIELDS

    seqs = [list(p) for p in prompts]
    rngs = []
    for seed in seeds:
        g = torch.Generator()
        g.manual_seed(seed)
        rngs.append(g)
    stats: list[dict[str, list[float]]] = [{f: [] for f in GEN_FIELDS} for _ in seqs]
    active = list(range(len(seqs)))
    hooks = model.bridge.hooks(fwd_hooks=fwd_hooks) if fwd_hooks is not None else nullcontext()
    with torch.inference_mode(), hooks:
        for _ in range(n):
            if not active:
                break
            tokens, _ = padded([seqs[r] for r in active], pad, model.device)
            logits = model.forward(tokens)
            for j, row in enumerate(list(active)):
                seq = seqs[row]
                last = logits[j, len(seq) - 1]
                model_p = torch.softmax(last.to(torch.float64), dim=-1)
                p = sampling_distribution(last, settings)
                token = int(torch.multinomial(p.cpu(), 1, generator=rngs[row]))
                s = stats[row]
                s["sample_prob"].append(float(p[token]))
                s["sample_entropy"].append(entropy(p))
                s["model_prob"].append(float(model_p[token]))
                s["model_entropy"].append(entropy(model_p))
                seq.append(token)
                if stop_token is not None and token == stop_token:
                    active.remove(row)
    return seqs, stats
