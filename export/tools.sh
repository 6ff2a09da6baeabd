#!/usr/bin/env bash
# What building the native runtime needs beyond the Python wheels, checked and (with `install`) installed only when
# missing: cmake, a C++17 compiler, and the headers the pytorch/tokenizers headers include (nlohmann/json, re2;
# declarations only: the compiled tokenizer comes from the pytorch-tokenizers wheel). `make setup` calls `install`.
#   export/tools.sh check|install
set -euo pipefail
DEBS="cmake g++ nlohmann-json3-dev libre2-dev"

have_tools() {
  command -v cmake > /dev/null && command -v c++ > /dev/null &&
    [ -f /usr/include/nlohmann/json.hpp ] && [ -f /usr/include/re2/re2.h ]
}

install() {
  have_tools && return 0
  command -v apt-get > /dev/null || { echo "export/tools.sh: no apt-get to install $DEBS" >&2; return 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $DEBS > /dev/null
  have_tools || { echo "export/tools.sh: $DEBS installed, but a tool or header is still missing" >&2; return 1; }
}

case "${1:-check}" in
  check) have_tools ;;
  install) install ;;
  *) echo "usage: export/tools.sh check|install" >&2; exit 2 ;;
esac
