"""Sampling: from logits to a sampled token (softmax with temperature, top-k and top-p (nucleus)
truncation), and the one generation loop (:func:`generate`) that ``capture --generate`` and the
steering analysis both run.

Computed in float64 so that entropies and probabilities of near-certain tokens are not rounded
away. A temperature of 0 means greedy decoding: the distribution puts all mass on the argmax.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from workbench.errors import UserError
from workbench.models import kv_cache

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


class _Recompute:
    """Next-token logits by rerunning every active row's whole sequence (right-padded)."""

    def __init__(self, model: Model, seqs: list[list[int]], pad: int) -> None:
        self.model, self.seqs, self.pad = model, seqs, pad

    def __call__(self, active: list[int]) -> dict[int, Any]:
        tokens, _ = padded([self.seqs[r] for r in active], self.pad, self.model.device)
        logits = self.model.forward(tokens)
        return {row: logits[j, len(self.seqs[row]) - 1] for j, row in enumerate(active)}


class _Cached:
    """Next-token logits with the model's key-value cache: one pass over the left-padded
    prompts, then one token per row per step (a finished row is fed its last token again and
    ignored). Positions come from the attention mask, so left padding moves no real token."""

    def __init__(self, model: Model, seqs: list[list[int]], pad: int) -> None:
        self.model, self.seqs, self.pad = model, seqs, pad
        self.past: Any = None
        self.mask: Any = None

    def __call__(self, active: list[int]) -> dict[int, Any]:
        with kv_cache.passing():
            return self._step(active)

    def _step(self, active: list[int]) -> dict[int, Any]:
        import torch

        device = self.model.device
        if self.past is None:
            longest = max(len(s) for s in self.seqs)
            tokens = torch.full((len(self.seqs), longest), self.pad, dtype=torch.long)
            self.mask = torch.zeros((len(self.seqs), longest), dtype=torch.long)
            for row, s in enumerate(self.seqs):
                tokens[row, longest - len(s):] = torch.tensor(s, dtype=torch.long)
                self.mask[row, longest - len(s):] = 1
            self.mask = self.mask.to(device)
            logits, self.past = self.model.bridge(tokens.to(device), attention_mask=self.mask,
                                                  return_type="logits_and_cache")
        else:
            new = torch.tensor([[s[-1]] for s in self.seqs], dtype=torch.long, device=device)
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            positions = (self.mask.cumsum(1) - 1)[:, -1:]
            with warnings.catch_warnings():  # transformers 5 renames the argument; the bridge passes the old name
                warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
                logits, self.past = self.model.bridge(new, attention_mask=self.mask, position_ids=positions,
                                                      past_key_values=self.past, return_type="logits_and_cache")
        return {row: logits[row, -1] for row in active}


def generate(model: Model, prompts: list[list[int]], n: int, settings: SamplingSettings,
             seeds: list[int], *, pad: int = 0, fwd_hooks: list[tuple[str, Any]] | None = None,
             stop_token: int | None = None, cache: bool = True
             ) -> tuple[list[list[int]], list[dict[str, list[float]]]]:
    """Sample up to ``n`` tokens after each of ``prompts`` (token ids; a decoder). Returns each
    whole sequence (prompt and sampled tokens) and, per row, each step's statistics (the names of
    :data:`~workbench.store.schema.GEN_FIELDS`: the chosen token's probability under the sampling
    distribution and under the model, and both distributions' entropies).

    With ``cache`` (the default) the prompts are run once and each step feeds only the new
    token, through the model's key-value cache (:mod:`workbench.models.kv_cache`); without it
    every step reruns the whole sequence. Both give the same tokens (the logits agree to
    rounding: tested); ``fwd_hooks`` (``(hook name, function)``) are active throughout, and with
    the cache they see each new position on its own — pass ``cache=False`` for a hook that
    depends on where in the sequence it is. Row ``r`` draws from its own ``torch.Generator``
    seeded with ``seeds[r]``, so a batch generates exactly what each prompt would alone, up to
    rounding. A row stops early once it samples ``stop_token``."""
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
    step = (_Cached if cache and model.family == "decoder" else _Recompute)(model, seqs, pad)
    hooks = model.bridge.hooks(fwd_hooks=fwd_hooks) if fwd_hooks is not None else nullcontext()
    with torch.inference_mode(), hooks:
        for _ in range(n):
            if not active:
                break
            logits = step(active)
            for row in list(active):
                last = logits[row]
                model_p = torch.softmax(last.to(torch.float64), dim=-1)
                p = sampling_distribution(last, settings)
                token = int(torch.multinomial(p.cpu(), 1, generator=rngs[row]))
                s = stats[row]
                s["sample_prob"].append(float(p[token]))
                s["sample_entropy"].append(entropy(p))
                s["model_prob"].append(float(model_p[token]))
                s["model_entropy"].append(entropy(model_p))
                seqs[row].append(token)
                if stop_token is not None and token == stop_token:
                    active.remove(row)
    return seqs, stats
