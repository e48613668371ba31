#!/usr/bin/env bash
# The GPU run, ready to go: on a CUDA machine with PyTorch and transformers installed and no network, run the CUDA
# tests and the PrefixModel-vs-peft, training and serving benchmarks in bf16, and write each one's output (its
# Markdown tables) to benchmarks/results/gpu-*.md. About 10 minutes at most: every step has its own time limit.
#
#   bash benchmarks/gpu.sh               # from anywhere; PYTHON=/path/to/python to pick the interpreter
#   bash benchmarks/gpu.sh --cpu-smoke   # no GPU: the same commands with tiny sizes on CPU, a few seconds each
#                                        # (checks that every script accepts the flags passed here)
#
# Models: random-init ones built by the scripts themselves (train.py --random: a 12-layer Llama, hidden 768, vocab
# 32000, with generated data). Nothing is fetched: SmolLM2 (517 MB as fp32, 94 MB as its GGUF) is too big for the
# repository to carry; with --smollm2, train.py uses it from the prefixtune cache ($PREFIXTUNE_CACHE or
# ~/.cache/prefixtune) when it is already there, and the script stops if it is not.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
SMOKE=0
SMOLLM2=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    --smollm2) SMOLLM2=1 ;;
    *) echo "gpu.sh: unknown argument $arg (use --cpu-smoke or --smollm2)" >&2; exit 2 ;;
  esac
done

# The project from this checkout, without its dependencies (there is no network): its source on the path, so
# nothing is built or installed.
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "transformers", "accelerate", "datasets", "safetensors", "peft", "pandas", "yaml", "tqdm",
        "matplotlib", "pytest"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
) || { echo "gpu.sh: $PY does not run" >&2; exit 2; }
if [ -n "$missing" ]; then
  echo "gpu.sh: missing Python packages: $missing (install their wheels with pip install --no-deps; the [train,peft] extras and pytest)" >&2
  exit 2
fi

if [ "$SMOKE" = 1 ]; then
  DEVICE=(--device cpu --dtype float32)
  # appended after the real flags: argparse keeps the last value, so every real flag is still parsed
  TINY_PM=(--layers 2 --hidden 64 --batch 2 --seq 16 --steps 1 --new-tokens 4)
  TINY_TRAIN=(--steps 1 --warmup 0 --batch 2 --train 8 --eval 4 --only af --threads 1)
  TINY_SERVE=(--adapters 2 --requests 4 --prompt 8 --output 4 --layers 2 --hidden 64 --vocab 256 --rounds 1 --threads 1)
  OUT="$(mktemp -d)"
else
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: CUDA is not available to $PY (torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')): run this on a CUDA machine, or pass --cpu-smoke to check the commands on CPU" >&2
    exit 3
  fi
  DEVICE=(--device cuda --dtype bfloat16)
  TINY_PM=(); TINY_TRAIN=(); TINY_SERVE=()
  OUT="$ROOT/benchmarks/results"
fi
TRAIN_DATA=(--random)
if [ "$SMOLLM2" = 1 ]; then
  CACHE="${PREFIXTUNE_CACHE:-$HOME/.cache/prefixtune}"
  if [ ! -f "$CACHE/smollm2-135m-instruct/model.safetensors" ] || [ ! -d "$CACHE/wheels" ]; then
    echo "gpu.sh: --smollm2: SmolLM2 or the tweets are not in $CACHE (this script never fetches); drop --smollm2" >&2
    exit 2
  fi
  TRAIN_DATA=()
fi
mkdir -p "$OUT"
failed=()

# run NAME SECONDS COMMAND...: the command's output (stdout and stderr) under a header to $OUT/gpu-NAME.md
run() {
  local name="$1" limit="$2"; shift 2
  local file="$OUT/gpu-$name.md" start=$SECONDS
  echo "== $name (at most ${limit}s): $*"
  {
    echo "# gpu-$name"
    echo
    echo "\`$*\` on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke run: tiny sizes, not a GPU figure)")'), torch $("$PY" -c 'import torch; print(torch.__version__)'), $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
  } > "$file.tmp"
  timeout "$limit" "$@" >> "$file.tmp" 2>&1
  local rc=$?
  echo >> "$file.tmp"
  echo "exit status $rc after $((SECONDS - start))s" >> "$file.tmp"
  mv "$file.tmp" "$file"
  if [ "$rc" != 0 ]; then failed+=("$name (exit $rc)"); fi
  tail -n 25 "$file"
}

if [ "$SMOKE" = 1 ]; then
  # the CUDA tests need CUDA; on CPU check only that they are collected
  run tests 120 "$PY" -m pytest -q -m gpu --collect-only tests/test_gpu.py
else
  run tests 240 "$PY" -m pytest -q -m gpu -x tests/test_gpu.py
fi
run prefix-model 90 "$PY" benchmarks/prefix_model.py "${DEVICE[@]}" --steps 10 "${TINY_PM[@]}"
run train 150 "$PY" benchmarks/train.py "${DEVICE[@]}" "${TRAIN_DATA[@]}" --steps 20 --warmup 2 "${TINY_TRAIN[@]}"
run serve 110 "$PY" benchmarks/serve.py "${DEVICE[@]}" --output 128 "${TINY_SERVE[@]}"

echo "results in $OUT/gpu-*.md"
if [ "${#failed[@]}" != 0 ]; then
  echo "gpu.sh: failed: ${failed[*]}" >&2
  exit 1
fi
