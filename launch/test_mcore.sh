#!/usr/bin/env bash
# Run core tests against another megatron-core line, beside the main environment:
#   bash launch/test_mcore.sh 0.19.2 [pytest args]     (after launch/test.sh or launch/install.sh)
# Makes ./.venv-mcore-VERSION whose own site-packages hold only that megatron-core and this project
# (a regular install, not editable); every other dependency comes from ./.venv through a .pth line.
# Python 3.11 gets megatron-core >= 0.17 with --ignore-requires-python (its wheels install and run).
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:?usage: $0 MEGATRON_CORE_VERSION [pytest args]}"
shift
env_dir=".venv-mcore-$version"
# megatron-core >= 0.19 imports triton at module level (MoE paged stash), CPU machines included
EXTRA_PACKAGES=()
case "$version" in 0.1[0-8].*) ;; *) EXTRA_PACKAGES=(triton) ;; esac
[ -x .venv/bin/python ] || { echo "run launch/install.sh first (./.venv)" >&2; exit 2; }
base_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf "$env_dir"
"$(readlink -f .venv/bin/python)" -m venv --without-pip "$env_dir"
site=$("$env_dir/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
printf '%s\n' "$base_site" > "$site/main-environment.pth"
.venv/bin/python -m pip install --quiet --no-deps --no-compile --no-build-isolation --ignore-requires-python --target "$site" \
  "megatron-core==$version" "${EXTRA_PACKAGES[@]}" .
"$env_dir/bin/python" -P -c "import slowqk, megatron.core as m; print('megatron-core', m.__version__, 'from', m.__file__)"
# -P / PYTHONSAFEPATH (inherited by subprocesses): the checkout's slowqk/ must not shadow the
# installed package, whose patches/ sits inside it
export PYTHONSAFEPATH=1
exec "$env_dir/bin/python" -P -m pytest -q -p no:cacheprovider "$@"
