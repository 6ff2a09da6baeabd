#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS each (default 60): the native libFuzzer target, then the atheris ones.
# Exits non-zero on the first finding, whose input is kept under build/fuzz/findings/ (see fuzz/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${FUZZ_SECONDS:-60}
PY=${PY:-.venv/bin/python}
OUT=build/fuzz
ET=$("$PY" -c "import executorch; print(list(executorch.__path__)[0])")
TOK=$("$PY" -c "import pytorch_tokenizers; print(list(pytorch_tokenizers.__path__)[0])")
mkdir -p "$OUT/findings" "$OUT/logs"

# The tiny bundle every manifest input may name (exported once, then reused) and its valid manifests as seeds.
"$PY" fuzz/make_seed_bundle.py "$OUT/work"
export COSMOES_FUZZ_BUNDLE="$PWD/$OUT/work/bundle"

cmake -S fuzz -B "$OUT/native" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_PREFIX_PATH="$ET" \
  -DCOSMOES_TOKENIZERS_DIR="$TOK" > "$OUT/logs/cmake.log"
cmake --build "$OUT/native" -j 2 --target manifest_fuzzer >> "$OUT/logs/cmake.log"

# One target: libFuzzer's flags, its own growing corpus first (new inputs land there), then the committed seeds.
# The full output goes to a log (ExecuTorch logs a few lines per process); the console gets the verdict.
fuzz() {
  local name=$1 seeds=$2
  shift 2
  mkdir -p "$OUT/corpus/$name"
  local log="$OUT/logs/$name.log" rc=0
  "$@" -max_total_time="$SECONDS_EACH" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
    -artifact_prefix="$OUT/findings/$name-" "$OUT/corpus/$name" $seeds > "$log" 2>&1 || rc=$?
  local done_line
  done_line=$(grep -E '^Done [0-9]+ runs' "$log" | tail -1 || true)
  if [ "$rc" -ne 0 ]; then
    grep -vE '^[IWE] [0-9]{2}:' "$log" | tail -40
    echo "fuzz $name: FINDING (exit $rc); input under $OUT/findings/, full log $log"
    exit 1
  fi
  echo "fuzz $name: ${done_line:-no runs?} — no finding"
}

fuzz native "fuzz/corpus/manifest $OUT/work/seeds" "$OUT/native/manifest_fuzzer"
fuzz py-manifest "fuzz/corpus/manifest $OUT/work/seeds" "$PY" fuzz/python_fuzzer.py manifest
fuzz py-config fuzz/corpus/config "$PY" fuzz/python_fuzzer.py config
fuzz py-metrics fuzz/corpus/metrics "$PY" fuzz/python_fuzzer.py metrics
fuzz py-policy fuzz/corpus/policy "$PY" fuzz/python_fuzzer.py policy
