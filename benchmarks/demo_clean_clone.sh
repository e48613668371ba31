#!/usr/bin/env bash
# usage: ../shared/tools/quiet-run -- bash benchmarks/demo_clean_clone.sh   (the README's demo figures: time and accuracy)
# The README's demo command on a clean clone of main (fresh venv, fresh asset cache); install and demo timed apart.
set -euo pipefail
rm -rf /tmp/clean && git clone -q "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)" /tmp/clean && cd /tmp/clean
export PREFIXTUNE_CACHE=/tmp/clean-cache; rm -rf "$PREFIXTUNE_CACHE"
git log -1 --format='commit %h %cd'
cmd=$(grep -m1 '&& prefixtune demo$' README.md)
install=${cmd% && prefixtune demo}
echo "install: $install"
t0=$(date +%s)
bash -c "$install > /tmp/demo-install.log 2>&1; . .venv/bin/activate && which prefixtune"
t1=$(date +%s); echo "install took: $((t1-t0)) s"
. .venv/bin/activate
prefixtune demo 2>&1 | tee /tmp/demo.log
t2=$(date +%s); echo "demo took: $((t2-t1)) s"
