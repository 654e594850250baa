#!/usr/bin/env bash
# Every GPU check of issue 29 in one run (about 6 minutes on an H100/H200), results under $OUT:
#   kernels.log / kernels.xml  the Triton kernels compiled for the GPU (no interpreter) against their torch twins
#   bench_7b_b{1,4,16}.json    `tokenreduce bench --llm 7b` at batch 1, 4, 16 with direct rows (+ .txt tables)
#   syncs.json                 sync points per prefill under torch.cuda.set_sync_debug_mode, wrapped - unwrapped
#   codebook.json              VQToken's k-means with faiss-gpu (extra `vq-gpu`) against the torch k-means
#                              (faiss-gpu is a CUDA 12 build: where the machine lacks libcudart.so.12 /
#                              libcublas.so.12, the file records it as unavailable and times the torch k-means)
#
# The machine has its own torch / triton and no network: the pinned transformers (and what it needs beyond
# the machine's packages) and faiss-gpu travel as wheels in .whl/ (git-ignored), fetched here once with
#   benchmarks/gpu_check.sh --fetch-wheels
# and carried with the call (carry: [".whl"]). Check the script without a GPU with
#   benchmarks/gpu_check.sh --cpu     (OUT defaults to runs/gpu-check-cpu; kernels under the interpreter, quick bench)
#   benchmarks/gpu_check.sh --dry-run (prints the commands only)
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  --dry-run) MODE=dry ;;
  --fetch-wheels)
    echo /.whl/ >> .git/info/exclude 2>/dev/null || true
    mkdir -p .whl
    plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
    # the `vq-gpu` extra's distribution at the version constraints.txt pins (faiss-gpu-cu12: 48 MB, the
    # newer `faiss-gpu` wheel is 135 MB, over the 64 MiB a call may carry)
    vq_gpu=$(python3 -c 'import re, tomllib; print(re.split(r"[<>=!~ ;\[]", tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["vq-gpu"][0])[0])')
    faiss_pin=$(grep -i "^$vq_gpu==" constraints.txt) || { echo "no pin for $vq_gpu in constraints.txt" >&2; exit 1; }
    for pkg in transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 safetensors==0.8.0 "$faiss_pin"; do
      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl "$pkg" || exit 1
    done
    du -cb .whl/*.whl | tail -n 1 | awk '{ printf "wheels: %.1f MiB (a call carries 64 MiB with the work tree)\n", $1 / 1048576 }'
    exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--cpu | --dry-run | --fetch-wheels]" >&2; exit 2 ;;
esac
OUT="${OUT:-runs/gpu-check-$MODE}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
run() {  # run "name" cmd... : time-boxed, output to $OUT/name.txt, never stops the script
  local name=$1; shift
  if [ "$MODE" = dry ]; then echo "[$name] $*"; return 0; fi
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  local start=$SECONDS
  timeout "${BUDGET:-150}" "$@" > "$OUT/$name.txt" 2>&1
  echo "   rc=$? in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.txt"
}
if [ "$MODE" = gpu ] && [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ "$MODE" = gpu ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1

if [ "$MODE" = cpu ]; then
  BUDGET=300 run kernels env TRITON_INTERPRET=1 $PY -m pytest -q -x tests/kernels/test_attention.py --junitxml="$OUT/kernels.xml"
  BUDGET=300 run bench_quick_b1 $PY -m tokenreduce.cli bench --quick --device cpu --repeats 1 --decode-tokens 0 \
    --methods pool-64 atp-25% --out "$OUT/bench_quick_b1.json"
  BUDGET=300 run gpu_check $PY benchmarks/gpu_check.py --cpu --out "$OUT"
else
  # conftest sets TRITON_INTERPRET=1 only when unset: 0 compiles the kernels for the GPU
  BUDGET=100 run kernels env TRITON_INTERPRET=0 $PY -m pytest -q tests/kernels --junitxml="$OUT/kernels.xml"
  for b in 1 4 16; do
    BUDGET=90 run "bench_7b_b$b" $PY -m tokenreduce.cli bench --device cuda --llm 7b --batch "$b" --repeats 3 \
      --decode-tokens 4 --out "$OUT/bench_7b_b$b.json"
  done
  BUDGET=80 run gpu_check $PY benchmarks/gpu_check.py --out "$OUT"
fi
echo "results in $OUT"
