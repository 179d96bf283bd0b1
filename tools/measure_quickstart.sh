#!/usr/bin/env bash
# The README's first command, timed in this checkout with its environment already installed (the
# install check included), into docs/results/quickstart/measured.json with the commit.
#   bash tools/measure_quickstart.sh
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$(date +%s.%N)
bash launch/quickstart.sh --out "$work/quickstart" > "$work/out.txt" 2>&1
end=$(date +%s.%N)
.venv/bin/python - "$work" "$start" "$end" "$(git rev-parse --short=7 HEAD)" \
  docs/results/quickstart/measured.json <<'PY'
import json, os, sys
work, start, end, commit, out = sys.argv[1:]
runs = json.load(open(os.path.join(work, "quickstart", "results.json")))
record = {
    "commit": commit,
    "command": "bash launch/quickstart.sh (environment installed; output in a scratch folder)",
    "cpu_count": os.cpu_count(),
    "wall_seconds": round(float(end) - float(start), 1),
    "arms": {
        name: {k: s[k] for k in ("steps", "train_seconds", "final_val_loss")}
        for name, s in runs.items()
    },
}
json.dump(record, open(out, "w"), indent=2)
print(json.dumps(record, indent=2))
PY
