#!/usr/bin/env bash
# The whole GPU acceptance check in one script, for an offline GPU machine.
#   bash launch/gpu_check.sh prepare [megatron-core version]   # here, with registries: wheels -> .whl/, corpus -> .gpu/
#   bash launch/gpu_check.sh run [tests] [bench] [knobs] [fused] [profile]   # there: logs and records -> $OUT (default: all)
#   SMOKE=1 bash launch/gpu_check.sh run                         # the same code path on CPU, tiny recipes, one step
# `run` installs the wheels into /tmp/site, runs tests/test_gpu.py, benchmarks gpt-125m, llama-350m and
# llama-1b (megatron-core off/hold/after beside plain/plain-compiled PyTorch; records as JSON),
# measures the recomputation knobs (tokens/s, peak memory; the memory report against the GPU),
# train.fused_kernels on llama-1b and profiles one llama-1b step. Each phase has its own
# time limit so a slow phase cannot take the others with it; copy $OUT to docs/results/gpu/ after.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"

if [ "$mode" = prepare ]; then
  set -e
  shared="${SLOWQK_SHARED_DIR:-../shared}"
  bash "$shared/device/fetch_wheels.sh" "${2:-0.16.1}"
  mkdir -p .gpu/shared/data/shakespeare
  cp "$shared/data/shakespeare/shakespeare_modern.txt" .gpu/shared/data/shakespeare/
  for path in .whl .gpu; do grep -qx "$path/" .git/info/exclude 2>/dev/null || echo "$path/" >> .git/info/exclude; done
  du -sh .whl .gpu
  exit 0
fi
[ "$mode" = run ] || { echo "usage: $0 prepare [mcore version] | run [tests] [bench] [knobs] [fused] [profile]" >&2; exit 2; }
shift
phases="${*:-tests bench knobs fused profile}"
wants() { case " $phases " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

export PYTHONUNBUFFERED=1
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
export SLOWQK_SHARED_DIR="${SLOWQK_SHARED_DIR:-$PWD/.gpu/shared}"
corpus="$SLOWQK_SHARED_DIR/data/shakespeare/shakespeare_modern.txt"
big=llama-1b mid=llama-350m gpt=gpt-125m steps=10 warmup=3 vocab=32000 batch=train.global_batch_size=64
if [ "${SMOKE:-0}" = 1 ]; then  # CPU trial of every phase's code path
  big=tiny/llama mid=tiny/llama gpt=tiny/gpt steps=1 warmup=1 vocab=512 batch=train.global_batch_size=16
  corpus="$SLOWQK_SHARED_DIR/data/tinyshakespeare/input.txt"
fi
t0=$(date +%s)
phase() { echo "== $1 (t=$(( $(date +%s) - t0 ))s)"; }

if ! python3 -c "import megatron.core, slowqk" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site
  [ -d /tmp/site/recipes ] || ln -sfn "$PWD/recipes" /tmp/site/recipes  # a wheel built without its recipes
fi
{ if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
  python3 -c "import sys, torch, megatron.core as m; print('python', sys.version.split()[0], 'torch', torch.__version__, 'megatron-core', m.__version__)"
} | tee "$OUT/env.txt"

if wants tests; then
  phase "GPU tests"
  (cd tests && timeout 150 python3 -m pytest -q -s -p no:cacheprovider test_gpu.py) > "$OUT/pytest_gpu.log" 2>&1
  tail -5 "$OUT/pytest_gpu.log"
fi

bench() {  # name timeout args...
  local name="$1" limit="$2"; shift 2
  phase "bench $name"
  timeout "$limit" python3 tools/bench_gpu.py --steps "$steps" --warmup "$warmup" --vocab "$vocab" --corpus "$corpus" \
    --json "$OUT/bench_$name.json" "$@" > "$OUT/bench_$name.log" 2>&1
  tail -9 "$OUT/bench_$name.log"
}
if wants bench; then  # the largest model first: its targets matter most
  bench llama-1b 150 --recipes "$big" -- "$batch"
  bench llama-350m 100 --recipes "$mid" -- "$batch"
  bench gpt-125m 70 --recipes "$gpt" --cases off hold after plain -- "$batch"
fi
if wants knobs; then  # each knob's tokens/s and peak memory; the prediction against a GPU
  bench llama-1b-knobs 120 --recipes "$big" --cases off selective full -- "$batch"
  for rc in none selective full; do
    phase "memory $mid recompute=$rc"
    timeout 60 torchrun --standalone --nproc-per-node=1 -m slowqk.memory.check "$mid" \
      "data.tokenizer_vocab_size=$vocab" "train.recompute.granularity=$rc" \
      > "$OUT/memory_$rc.json" 2> "$OUT/memory_$rc.log"
    tail -c 600 "$OUT/memory_$rc.json"
  done
fi
wants fused && bench llama-1b-fused 45 --recipes "$big" --cases off -- "$batch" train.fused_kernels=true

if wants profile; then
  phase "profile $big"
  timeout 40 python3 tools/profile_step.py --steps 1 --warmup 2 --vocab "$vocab" --corpus "$corpus" \
    --out "$OUT/profile" -- "$big" train.global_batch_size=8 > "$OUT/profile.log" 2>&1
  rm -f "$OUT/profile/trace.json"  # large; the top-kernel table is what is kept
  head -30 "$OUT/profile/top_kernels.txt" 2>/dev/null
fi
phase "done"
