"""Load a model through workbench, look at how it tokenizes, and at what it predicts.

    python examples/quickstart.py                 # the embedded default, SmolLM2-135M
    python examples/quickstart.py tiny-gpt2       # any name `workbench models` lists
"""

from __future__ import annotations

import sys

import workbench


def main(name: str = workbench.DEFAULT_MODEL) -> None:
    model = workbench.load_model(name)
    info = model.info
    print(f"{info.name}: {info.family} {info.architecture}, {info.n_layers} layers, "
          f"{info.n_heads} query / {info.n_kv_heads} KV heads, context {info.n_ctx}")
    print(f"BOS policy {info.bos.policy!r}: prefix {list(info.bos.prefix)}, suffix {list(info.bos.suffix)}")

    prompt = "The capital of France is"
    for policy in ("tokenizer", "prepend"):
        pred = model.predict(prompt, k=3, bos=policy)
        tops = ", ".join(f"{t.token!r} {t.prob:.3f}" for t in pred.top)
        print(f"bos={policy:9} tokens={pred.str_tokens} -> {tops}")

    # The bridge is TransformerLens' TransformerBridge: its hooks and caches work as usual.
    import torch

    tokens = torch.tensor([model.tokenize(prompt)])
    _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    norms = [round(float(cache[f"blocks.{layer}.hook_resid_post"][0, -1].norm()), 1)
             for layer in range(info.n_layers)]
    print(f"residual-stream norm at the last position, layer by layer: {norms}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
