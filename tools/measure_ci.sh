#!/usr/bin/env bash
# `.ci/run` from a fresh clone of this checkout (beside it, so ../shared resolves), timed; its
# figures into docs/results/ci/fresh_clone.json with the commit. The README's Tests section quotes
# that file. --cold first empties pip's cache and removes podman's images, as on a new machine.
#   bash tools/measure_ci.sh [--cold]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cold=""
if [ "${1:-}" = --cold ]; then
  cold=" (pip's cache purged and podman's images removed first)"
  "$repo/.venv/bin/pip" cache purge -q >/dev/null 2>&1 || true
  CONTAINERS_CONF="$repo/docker/containers.conf" podman rmi -a -f >/dev/null 2>&1 || true
fi
clone="$(dirname "$repo")/ci-measure"
rm -rf "$clone"
git clone -q "$repo" "$clone"
log="$(mktemp)"
start=$(date +%s)
set +e
(cd "$clone" && bash .ci/run) > "$log" 2>&1
rc=$?
set -e
end=$(date +%s)
"$repo/.venv/bin/python" - "$log" "$rc" "$((end - start))" "$(git -C "$repo" rev-parse --short=7 HEAD)" \
  "$repo/docs/results/ci/fresh_clone.json" "$cold" <<'PY'
import json, re, sys
log, rc, seconds, commit, out, cold = sys.argv[1:]
text = open(log, errors="replace").read()
# pytest's closing lines ("366 passed, 4 skipped in 1209.00s"), in order
runs = re.findall(r"^=*\s*(\d+ (?:passed|failed)[^\n]*?) in ([\d.]+)s", text, re.M)
def counts(line):
    return {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", line)}
record = {
    "commit": commit,
    "command": "bash .ci/run (fresh clone)" + cold,
    "exit_code": int(rc),
    "seconds": int(seconds),
    "suite": {**counts(runs[0][0]), "seconds": float(runs[0][1])} if runs else None,
    "megatron_core_0_19_subset": {**counts(runs[1][0]), "seconds": float(runs[1][1])}
    if len(runs) > 1 else None,
    "image_build": (re.findall(r"image \S+: (\d+) MB, built in (\d+) s", text) or [None])[-1],
}
json.dump(record, open(out, "w"), indent=2)
print(json.dumps(record, indent=2))
PY
tail -n 30 "$log"
exit "$rc"
