#!/usr/bin/env bash
# What a session with a lent GPU runs, one part per call (each well under the 10-minute call limit):
#   bash bench/gpu_session.sh check   # CUDA tests + Triton kernels on the GPU + noise kernel timings
#   bash bench/gpu_session.sh small   # OPT 1.3B/2.7B: resident, offloaded, offloaded-skip, budget sweep
#   bash bench/gpu_session.sh large   # OPT 6.7B/13B
#   bash bench/gpu_session.sh huge    # OPT 30B, and 66B/175B cut to 4 blocks
#   bash bench/gpu_session.sh scopes  # OPT 13B offloaded, unit scope (the default, module scope, is in "large")
# Results go to $OUT (or bench/results/gpu) as JSON + markdown (+ budget.png).
set -euo pipefail
# the working tree's zo2, without installing anything (the GPU machine's torch/transformers stay as they are)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
case "${1:-check}" in
  check)
    python -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py 2>&1 | tail -5
    for noise in gaussian rademacher; do
      python bench/noise_bench.py --device cuda --numel 1000000000 --dtype bfloat16 --noise "$noise" --kernels torch triton
    done 2>&1 | tee "$out/noise.txt" ;;
  small)
    python bench/bench.py --device cuda --sizes 1.3b 2.7b --budgets 2GB 3GB 4GB 6GB --out "$out/small" ;;
  large)
    python bench/bench.py --device cuda --sizes 6.7b 13b --out "$out/large" ;;
  huge)
    python bench/bench.py --device cuda --sizes 30b --modes offloaded offloaded-skip --out "$out/huge"
    python bench/bench.py --device cuda --sizes 66b 175b --depth 4 --modes offloaded --out "$out/cut" ;;
  scopes)
    python bench/bench.py --device cuda --sizes 13b --modes offloaded offloaded-skip --perturbation-scope unit \
      --out "$out/unit-scope" ;;
  *) echo "usage: $0 check|small|large|huge|scopes" >&2; exit 2 ;;
esac
