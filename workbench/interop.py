"""TransformerLens code on stored runs: a prompt of a run as an ``ActivationCache``.

This sits above the run reader (which imports neither torch nor TransformerLens) so that opening
and reading a run stays torch-free; calling :func:`activation_cache` imports both.

    import workbench
    run = workbench.open_run("run.h5")
    cache = workbench.activation_cache(run, 0)
    cache.accumulated_resid()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from workbench.store.reader import Run


def activation_cache(run: Run, i: int, model: Any = None, *, device: str = "cpu",
                     remove_batch_dim: bool = False) -> Any:
    """Prompt ``i`` of ``run`` as a TransformerLens ``ActivationCache``, so TransformerLens
    analysis code runs on a stored run: ``cache["resid_post", 3]``, ``cache.accumulated_resid()``,
    ``cache.decompose_resid()``, ``cache.stack_activation("pattern")``, ...

    Every name a tensor answers to is a key (stored name and aliases, one tensor each). Like a
    cache from ``model.run_with_cache(tokens)`` it has a batch dimension of 1, unless
    ``remove_batch_dim``. Without ``model`` the cache carries a stand-in with the model's
    TransformerLens config, enough for everything that needs no weights; pass the loaded model
    (a workbench ``Model`` or a ``TransformerBridge``) for weight-based helpers such as
    ``logit_attrs`` or ``stack_head_results``. Imports torch and TransformerLens."""
    import types

    import torch
    from transformer_lens.ActivationCache import ActivationCache

    tensors: dict[str, Any] = {}
    for spec in run.hooks.values():
        t = torch.from_numpy(np.ascontiguousarray(run.activation(spec.name, i))).to(device)
        if not remove_batch_dim:
            t = t.unsqueeze(0)
        for name in (spec.name, *spec.aliases):
            tensors[name] = t
    if model is None:
        cfg = types.SimpleNamespace(**run.model_info.get("tl_config", {}))
        model = types.SimpleNamespace(cfg=cfg)
    else:
        model = getattr(model, "bridge", model)
    return ActivationCache(tensors, model, has_batch_dim=not remove_batch_dim)
