"""Generation benchmark: sampling 64 tokens after each of 8 prompts on SmolLM2-135M, with the
key-value cache (what ``capture --generate`` and ``steering`` do now) against rerunning every
sequence at every step (what they did before), in one process, rounds interleaved.

    .venv/bin/python benchmarks/generation_bench.py                 # prints the table
    .venv/bin/python benchmarks/generation_bench.py --write BENCHMARKS.md

Both modes sample the same tokens (checked here every round, and in tests/test_generation.py).
The model is loaded once and not timed; the load average is read before each round.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from sections import replace_section

PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "In 1969, the first humans to walk on the Moon were",
    "A recipe for bread needs flour, water,",
    "The three laws of motion describe",
    "My favourite thing about autumn is",
    "def fibonacci(n):",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", metavar="FILE")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import workbench
    from workbench.capturing.sampling import SamplingSettings, generate

    model = workbench.load_model("smollm2-135m", device="cpu", progress=False)
    prompts = [model.tokenize(p) for p in PROMPTS]
    settings = SamplingSettings(temperature=0.8)
    seeds = list(range(len(prompts)))
    generate(model, prompts, 2, settings, seeds)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    loads = []
    for r in range(args.repeats):
        loads.append(os.getloadavg()[0])
        outputs = {}
        for cache in ((True, False) if r % 2 == 0 else (False, True)):
            start = time.perf_counter()
            outputs[cache], _ = generate(model, prompts, args.tokens, settings, seeds, cache=cache)
            times[cache].append(time.perf_counter() - start)
            print(f"round {r + 1} load {loads[-1]:.2f} cache={cache}: {times[cache][-1]:.2f} s", flush=True)
        assert outputs[True] == outputs[False], "the cache changed the sampled tokens"
    cached, full = statistics.median(times[True]), statistics.median(times[False])
    n_prompt = sum(map(len, prompts))
    text = "\n".join([
        "## Generation with the key-value cache (`benchmarks/generation_bench.py`)",
        "",
        (f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({platform.machine()}, torch "
         f"{torch.__version__}, {torch.get_num_threads()} threads): SmolLM2-135M in float32 samples "
         f"{args.tokens} tokens (temperature 0.8, seeded) after each of {len(prompts)} prompts "
         f"({n_prompt} prompt tokens), one batch; model loading not timed; {args.repeats} rounds, the two "
         "modes interleaved, medians. Load average (1 min) before each round: "
         + ", ".join(f"{x:.2f}" for x in loads) + "."),
        "",
        "| mode | seconds (median) | rounds | tokens/s |",
        "|---|---:|---|---:|",
        (f"| rerun every sequence at every step (before) | {full:.2f} | "
         + ", ".join(f"{t:.2f}" for t in times[False]) + f" | {args.tokens * len(prompts) / full:.1f} |"),
        (f"| key-value cache (now) | {cached:.2f} | " + ", ".join(f"{t:.2f}" for t in times[True])
         + f" | {args.tokens * len(prompts) / cached:.1f} |"),
        "",
        f"The cache is **{full / cached:.1f}x** faster; both sampled the same {args.tokens * len(prompts)} tokens "
        "in every round.",
        "",
    ])
    print(text)
    if args.write:
        replace_section(args.write, text)


if __name__ == "__main__":
    main()
