#!/usr/bin/env bash
# What fuzzing needs, checked and (with `install`) installed only when missing: Debian's clang with libFuzzer, and
# atheris in the venv. `make setup` calls `install` and shrugs at a failure (make test runs without these);
# `make fuzz` calls it and stops on one, so CI never skips the fuzz pass.
#   fuzz/tools.sh check|install       (PY: the venv's python; ATHERIS: the pip requirement)
set -euo pipefail
PY=${PY:-.venv/bin/python}
ATHERIS=${ATHERIS:-atheris==3.0.0}
DEBS="clang libclang-rt-dev"  # bookworm's clang 14 and its compiler-rt (libFuzzer, ASan, UBSan)

# A one-line fuzz target that links: clang++ and libFuzzer's runtime are both there.
have_libfuzzer() {
  command -v clang++ > /dev/null || return 1
  local dir rc=0
  dir=$(mktemp -d)
  printf 'extern "C" int LLVMFuzzerTestOneInput(const char*, unsigned long) { return 0; }\n' > "$dir/t.cc"
  clang++ -fsanitize=fuzzer,address,undefined "$dir/t.cc" -o "$dir/t" 2> /dev/null || rc=1
  rm -rf "$dir"
  return $rc
}

have_atheris() { "$PY" -c "import atheris" 2> /dev/null; }

install() {
  if ! have_libfuzzer; then
    command -v apt-get > /dev/null || { echo "fuzz/tools.sh: no apt-get to install $DEBS" >&2; return 1; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $DEBS > /dev/null
    have_libfuzzer || { echo "fuzz/tools.sh: $DEBS installed, but clang++ cannot link a libFuzzer target" >&2; return 1; }
  fi
  have_atheris || "$PY" -m pip install -q "$ATHERIS"
}

case "${1:-check}" in
  check) have_libfuzzer && have_atheris ;;
  install) install ;;
  *) echo "usage: fuzz/tools.sh check|install" >&2; exit 2 ;;
esac
