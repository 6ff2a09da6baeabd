#!/usr/bin/env bash
# What the linux-aarch64 build needs, checked and (with `install`) installed only when missing: Debian's
# cross-compiler (g++-aarch64-linux-gnu, with the arm64 glibc under /usr/aarch64-linux-gnu) and qemu-user
# (qemu-aarch64), plus the aarch64 wheels of executorch and pytorch-tokenizers (the versions the venv has),
# downloaded and unpacked into the cache ($COSMOES_CACHE, default ~/.cache/cosmoes; see cosmoes/runtime/cross.py).
# `make setup` calls `install` and shrugs at a failure (the arm64 tests then skip, naming why);
# `cosmoes native build --target linux-aarch64` fetches the wheels itself and names this script when a tool is missing.
#   export/recipes/linux-aarch64/tools.sh check|install|wheels       (PY: the venv's python)
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${PY:-.venv/bin/python}
DEBS="g++-aarch64-linux-gnu qemu-user"
SYSROOT=/usr/aarch64-linux-gnu

# A C++ program cross-compiled, then run under qemu-aarch64: both tools work together.
have_tools() {
  command -v aarch64-linux-gnu-g++ > /dev/null && command -v qemu-aarch64 > /dev/null || return 1
  local dir rc=0
  dir=$(mktemp -d)
  printf '#include <iostream>\nint main() { std::cout << "ok" << std::endl; }\n' > "$dir/t.cc"
  aarch64-linux-gnu-g++ -O1 "$dir/t.cc" -o "$dir/t" 2> /dev/null \
    && [ "$(qemu-aarch64 -L "$SYSROOT" "$dir/t" 2> /dev/null)" = ok ] || rc=1
  rm -rf "$dir"
  return $rc
}

wheels() { "$PY" -m cosmoes.runtime.cross wheels; }

install() {
  if ! have_tools; then
    command -v apt-get > /dev/null || {
      echo "linux-aarch64/tools.sh: no apt-get to install $DEBS (install them by hand: a cross g++ for" \
           "aarch64-linux-gnu and qemu-aarch64)" >&2
      return 1
    }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $DEBS > /dev/null
    have_tools || { echo "linux-aarch64/tools.sh: $DEBS installed, but a cross-compiled program does not run" \
                         "under qemu-aarch64" >&2; return 1; }
  fi
  wheels
}

case "${1:-check}" in
  check) have_tools ;;
  install) install ;;
  wheels) wheels ;;
  *) echo "usage: export/recipes/linux-aarch64/tools.sh check|install|wheels" >&2; exit 2 ;;
esac
