#!/usr/bin/env bash
# The GPU acceptance check and the GPU rung in one script, for an offline GPU machine.
#   bash launch/gpu_check.sh prepare [megatron-core version]   # here: wheels -> .whl/, data -> .gpu/
#   bash launch/gpu_check.sh run                 # there, acceptance: tests ranks bench knobs targets
#   bash launch/gpu_check.sh run rung            # there, the study (a second call)
#   SMOKE=1 bash launch/gpu_check.sh run [...]   # the same code path on CPU, tiny shapes, few steps
# Phases: tests (tests/test_gpu.py), ranks (tests that spawn gloo ranks, with CUDA visible), bench
# (llama-1b: megatron-core off / hold / compiled beside plain and plain-compiled PyTorch; llama-350m
# off / hold / plain; records as JSON), knobs (recomputation's tokens/s and peak memory), targets
# (each acceptance target met or missed: tools/gpu_targets.py), rung (recipes/study/gpu_rung.yaml:
# control vs the paper's recipe on a 34M GPT block, one pass over 22.2M tokens of Debian's
# documentation, seed by seed, then its summary); by name only: memory (the memory report against
# the GPU), fused (train.fused_kernels), profile (one llama-1b step). Each phase has its own time
# limit, so a slow phase cannot take the others with it, and writes its records to $OUT (default
# gpu-results/) as it goes: copy them to docs/results/gpu/ and docs/results/gpu-study/ after.
# The two calls take about 500 s and 240 s of limits: both fit a lent GPU's 15 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"

if [ "$mode" = prepare ]; then
  set -e
  shared="${SLOWQK_SHARED_DIR:-../shared}"
  bash "$shared/device/fetch_wheels.sh" "${2:-0.16.1}"
  mkdir -p .gpu/shared/data/shakespeare
  cp "$shared/data/shakespeare/shakespeare_modern.txt" .gpu/shared/data/shakespeare/
  mkdir -p .gpu/shared/data/tinyshakespeare
  cp "$shared/data/tinyshakespeare/input.txt" .gpu/shared/data/tinyshakespeare/
  if [ ! -f .gpu/corpus/dataset/manifest.json ]; then  # the rung's corpus: Debian's documentation
    python3 tools/build_doc_corpus.py --out build/gpu-corpus
    .venv/bin/slowqk tokenizer train build/gpu-corpus/docs.jsonl --out build/gpu-corpus/tok.model \
      --vocab-size 16384
    .venv/bin/slowqk data shard build/gpu-corpus/docs.jsonl --out .gpu/corpus/dataset \
      --tokenizer build/gpu-corpus/tok.model --workers 2 --split 98,2,0 --quiet
    cp build/gpu-corpus/corpus.json .gpu/corpus/
  fi
  for path in .whl .gpu; do grep -qx "$path/" .git/info/exclude 2>/dev/null || echo "$path/" >> .git/info/exclude; done
  du -sh .whl .gpu
  exit 0
fi
[ "$mode" = run ] || { echo "usage: $0 prepare [mcore version] | run [tests] [ranks] [bench] [knobs] [memory] [fused] [profile] [targets] [rung]" >&2; exit 2; }
shift
# Two calls fit a lent GPU's 15 minutes: `run` (acceptance, about 500 s of limits), then `run rung`
# (about 240 s); memory, fused and profile by name
phases="${*:-tests ranks bench knobs targets}"
wants() { case " $phases " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

export PYTHONUNBUFFERED=1
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
export SLOWQK_SHARED_DIR="${SLOWQK_SHARED_DIR:-$PWD/.gpu/shared}"
corpus="$SLOWQK_SHARED_DIR/data/shakespeare/shakespeare_modern.txt"
big=llama-1b mid=llama-350m gpt=gpt-125m steps=10 warmup=3 vocab=32000 batch=train.global_batch_size=64
rung=()  # the rung as recipes/rung/ says
if [ "${SMOKE:-0}" = 1 ]; then  # CPU trial of every phase's code path
  big=tiny/llama mid=tiny/llama gpt=tiny/gpt steps=1 warmup=1 vocab=512 batch=train.global_batch_size=16
  corpus="$SLOWQK_SHARED_DIR/data/tinyshakespeare/input.txt"
  rung=(model.num_layers=2 model.hidden_size=64 model.num_attention_heads=4 model.seq_length=64
        train.steps=3 train.micro_batch_size=2 train.global_batch_size=4 train.precision=fp32
        train.eval_interval=3 train.eval_iters=1)
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
  (cd tests && timeout 90 python3 -m pytest -q -s -p no:cacheprovider test_gpu.py) > "$OUT/pytest_gpu.log" 2>&1
  tail -5 "$OUT/pytest_gpu.log"
fi
if wants ranks; then  # tests that spawn gloo ranks, with CUDA visible to them
  phase "multi-rank CPU tests, CUDA visible"
  (cd tests && timeout 45 python3 -m pytest -q -p no:cacheprovider \
     "test_training.py::test_resume_is_exact_and_pp2_matches_pp1" \
     "test_lr_group_exactness.py::test_distributed_optimizer_matches_fp32_optimizer[groups-gqa-llama-pp2-vpp2-dp2]") \
    > "$OUT/pytest_ranks.log" 2>&1
  tail -5 "$OUT/pytest_ranks.log"
fi

bench() {  # name timeout args...
  local name="$1" limit="$2"; shift 2
  phase "bench $name"
  timeout "$limit" python3 tools/bench_gpu.py --steps "$steps" --warmup "$warmup" --vocab "$vocab" --corpus "$corpus" \
    --json "$OUT/bench_$name.json" "$@" > "$OUT/bench_$name.log" 2>&1
  tail -9 "$OUT/bench_$name.log"
}
if wants bench; then  # the largest model first: its targets matter most
  bench llama-1b 200 --recipes "$big" --cases off hold compiled plain plain-compiled -- "$batch"
  bench llama-350m 70 --recipes "$mid" --cases off hold plain -- "$batch"
fi
wants knobs && bench llama-1b-knobs 90 --recipes "$big" --cases selective full -- "$batch"
if wants memory; then  # the memory report's prediction against what a GPU holds
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
if wants targets; then
  phase "targets"
  python3 tools/gpu_targets.py "$OUT" --big "$big" --mid "$mid" | tee "$OUT/targets.txt"
fi
if wants rung; then  # control vs the paper's recipe, seed by seed; the summary even if cut short
  phase "rung"
  timeout 230 python3 -m slowqk.cli experiment run recipes/study/gpu_rung.yaml --out-dir "$OUT/rung" \
    "${rung[@]}" > "$OUT/rung.log" 2>&1
  tail -8 "$OUT/rung.log"
  python3 -m slowqk.cli experiment summarize "$OUT/rung" > "$OUT/rung_summary.txt" 2>&1
  tail -12 "$OUT/rung_summary.txt"
  rm -rf "$OUT"/rung/*/*/*/checkpoints "$OUT"/rung/data  # the records are what comes back
fi
phase "done"
