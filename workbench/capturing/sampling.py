"""From logits to a sampled token: softmax with temperature, top-k and top-p (nucleus) truncation.

Computed in float64 so that entropies and probabilities of near-certain tokens are not rounded
away. A temperature of 0 means greedy decoding: the distribution puts all mass on the argmax.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from workbench.errors import UserError


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
