#!/usr/bin/env bash
# Launch: RAY_AUTH_MODE=token cluster/submit.sh --address http://127.0.0.1:8265 -- sprout train configs/digits.yaml --set "eval.attacks=[pgd20]" --name demo
#
# `ray job submit` with cluster/runtime_env.yaml, the repository as the working dir, and the
# checkout's commit as SPROUT_GIT_SHA (the runs' git_sha: .git is never uploaded). Ray 2.60
# accepts only one of --runtime-env and --runtime-env-json, so this merges the commit into
# the runtime env and passes it as JSON. Every other argument goes to `ray job submit`.
# SPROUT_GIT_SHA set in your shell wins over `git rev-parse HEAD`.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
sha=${SPROUT_GIT_SHA:-$(git -C "$repo" rev-parse HEAD)}
env_json=$(python3 - "$repo/cluster/runtime_env.yaml" "$sha" <<'PY'
import json, sys
import yaml
env = yaml.safe_load(open(sys.argv[1]))
env.setdefault("env_vars", {})["SPROUT_GIT_SHA"] = sys.argv[2]
print(json.dumps(env))
PY
)
exec ray job submit --runtime-env-json "$env_json" --working-dir "$repo" "$@"
