#!/usr/bin/env bash
# tiny/gpt, 150 steps, the same seed, three vector paths: bash docs/results/reproduce/measure.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
out="$(mktemp -d)"
head -n 3000 "${SLOWQK_SHARED_DIR:-../shared}/data/tinyshakespeare/input.txt" > "$out/corpus.txt"
common=(data.corpus="$out/corpus.txt" data.tokenizer_vocab_size=512 train.steps=150 train.eval_interval=50 train.log_interval=1 train.progress_bar=false train.tensorboard=false qk.enabled=true)
for path in native avx2 default; do
  envs=()
  case $path in
    avx2) envs=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2) ;;
    default) envs=(ATEN_CPU_CAPABILITY=default) ;;
  esac
  env "${envs[@]}" OMP_NUM_THREADS=2 .venv/bin/slowqk train tiny/gpt "${common[@]}" out_dir="$out/$path" --quiet > "$out/$path.log" 2>&1
done
.venv/bin/python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def m(p): return {r["step"]: r for r in map(json.loads, (out / p / "metrics.jsonl").read_text().splitlines())}
base = m("native")
prov = json.loads((out / "native" / "summary.json").read_text())["provenance"]
print("native:", prov["kernels"], prov["cpu"])
for other in ("avx2", "default"):
    o = m(other)
    first = next((s for s in sorted(base) if base[s]["loss"] != o[s]["loss"]), None)
    worst = {}
    for key in ("loss", "grad_norm", "val_loss"):
        rel = [abs(base[s][key] - o[s][key]) / abs(base[s][key]) for s in base if base[s].get(key) is not None and o[s].get(key) is not None]
        worst[key] = max(rel)
    k = json.loads((out / other / "summary.json").read_text())["provenance"]["kernels"]
    print(f"{other}: {k['capability']}; first differing loss at step {first}; worst relative difference over 150 steps: " + ", ".join(f"{k2} {v:.2e}" for k2, v in worst.items()))
PY
