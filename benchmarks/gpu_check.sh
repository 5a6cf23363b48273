#!/usr/bin/env bash
# The checks to run whenever a machine with NVIDIA GPUs is lent (under 8 minutes on one GPU):
#   1. set up .venv/ (pip picks a CUDA torch when nvidia-smi works; see scripts/setup);
#   2. the capture benchmark's cases (a) and (b) on the GPU (one round);
#   3. a 2-worker sharded capture on the GPU(s) (--worker-gpus 1 when there are 2 GPUs, else 0.5
#      each on the one GPU), checked equal to a single-process capture of the same prompts.
# Tables go to stdout and to $OUT (or ./gpu-check/) as markdown.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
nvidia-smi -L | tee "$out/gpus.txt"
scripts/setup test,gemma
py=.venv/bin/python
$py -c 'import torch; assert torch.cuda.is_available(), "torch sees no GPU"; print("torch", torch.__version__, torch.cuda.get_device_name(0))' | tee -a "$out/gpus.txt"

echo "== capture benchmark, cases a and b, on cuda"
WORKBENCH_BENCH_DEVICE=cuda timeout 300 $py benchmarks/capture_bench.py --repeats 1 \
  --write "$out/BENCHMARKS-gpu.md" | tee "$out/capture.txt"

echo "== 2-worker sharded capture on cuda"
ngpu=$(nvidia-smi -L | wc -l)
per=$([ "$ngpu" -ge 2 ] && echo 1 || echo 0.5)
timeout 240 $py - "$out" "$per" <<'EOF' | tee "$out/sharded.txt"
import sys, time
import numpy as np
import workbench
sys.path.insert(0, "benchmarks")
from capture_bench import CASES, make_prompts

out, per = sys.argv[1], float(sys.argv[2])
_, hooks, n, (lo, hi), batch = CASES["a"]
prompts = make_prompts(n, lo, hi)
one = workbench.capture("smollm2-135m", prompts, hooks=hooks, out=f"{out}/one.h5", batch_size=batch,
                        device="cuda", progress=False, overwrite=True)
two = workbench.capture("smollm2-135m", prompts, hooks=hooks, out=f"{out}/two.h5", batch_size=batch,
                        device="cuda", progress=False, workers=2, worker_gpus=per, worker_cpus=1)
a, b = workbench.open_run(f"{out}/one.h5"), workbench.open_run(f"{out}/two.h5")
worst = max(float(np.max(np.abs(a.activation(h, i) - b.activation(h, i))))
            for i in range(0, len(a), 17) for h in ("blocks.15.hook_resid_post", "blocks.29.hook_resid_post"))
print("| mode | capture s | tokens/s | start-up s |")
print("|---|---|---|---|")
for label, r in (("1 process, cuda", one), (f"Ray, 2 workers ({per} GPU each)", two)):
    print(f"| {label} | {r.seconds:.2f} | {r.plan.n_tokens / r.seconds:,.0f} | {r.startup_seconds:.1f} |")
print(f"largest |difference| between the two runs (same batches): {worst:.3g}")
EOF
echo "gpu_check: done; tables in $out/"
