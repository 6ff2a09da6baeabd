#!/usr/bin/env bash
# Fills Sources/CCosmoes/vendor/ with the headers runtime/tokenizer.cpp compiles against in the package's prebuilt
# mode (Package.swift): pytorch/tokenizers and the nlohmann-json, re2 and abseil headers its headers include, at the
# commits ExecuTorch v<version> pins, i.e. the sources of the libtokenizers.a inside ExecuTorch's executorch_llm Swift PM
# framework of that version (no framework ships these headers). Runs on a developer's Mac (git and the network);
# not run in this project's CI, which reaches neither.
#
#   ios_demo/CosmoesKit/fetch_tokenizer_headers.sh [--help]
#
# The version is the venv's executorch wheel's, else pyproject.toml's pin, as export/recipes/ios/build_library.sh
# reads it; the ExecuTorch checkout is the one that script uses ($COSMOES_CACHE/executorch-v<version>/executorch, or
# EXECUTORCH_SRC), cloned here without its other submodules when missing.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VENDOR=$HERE/Sources/CCosmoes/vendor

die() {
  echo "fetch_tokenizer_headers.sh: $*" >&2
  exit 1
}
case ${1:-} in
  -h | --help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) die "unknown argument '$1' (see --help)" ;;
esac
command -v git > /dev/null || die "git not found"

. "$ROOT/export/recipes/executorch_version.sh"
ET_TAG=$(executorch_tag "$ROOT") || die "cannot tell the ExecuTorch version: no executorch in .venv and no executorch== pin in pyproject.toml"
ET_VERSION=${ET_TAG#v}

ET_SRC=${EXECUTORCH_SRC:-${COSMOES_CACHE:-$HOME/.cache/cosmoes}/executorch-$ET_TAG/executorch}
if [ ! -e "$ET_SRC/.git" ]; then
  [ ! -e "$ET_SRC" ] || die "$ET_SRC exists but is not a git checkout: remove it or set EXECUTORCH_SRC"
  echo "== cloning ExecuTorch $ET_TAG (no submodules) into $ET_SRC"
  mkdir -p "$(dirname "$ET_SRC")"
  git clone --depth 1 --branch "$ET_TAG" https://github.com/pytorch/executorch.git "$ET_SRC"
fi
have=$(tr -d '[:space:]' < "$ET_SRC/version.txt" 2> /dev/null || true)
[ "$have" = "$ET_VERSION" ] || die "$ET_SRC holds ExecuTorch ${have:-of another version}, not $ET_VERSION"

TOK=$ET_SRC/extension/llm/tokenizers
echo "== checking out the tokenizers submodule and the header-only parts it needs"
git -C "$ET_SRC" submodule update --init --depth 1 extension/llm/tokenizers
git -C "$TOK" submodule update --init --depth 1 third-party/json third-party/re2 third-party/abseil-cpp
for dir in include/pytorch/tokenizers third-party/json/single_include/nlohmann third-party/re2/re2 \
  third-party/abseil-cpp/absl; do
  [ -d "$TOK/$dir" ] || die "$TOK/$dir is missing: the submodule checkout failed"
done

# Only headers are copied (.h, .hpp, .inc): the package compiles none of these sources.
copy_headers() { # SRC DEST
  (cd "$1" && find . -type f \( -name '*.h' -o -name '*.hpp' -o -name '*.inc' \) -print0) |
    (cd "$1" && xargs -0 tar -cf -) | (mkdir -p "$2" && cd "$2" && tar -xf -)
}
rm -rf "$VENDOR"
copy_headers "$TOK/include" "$VENDOR/tokenizers/include"
copy_headers "$TOK/third-party/json/single_include" "$VENDOR/json/single_include"
copy_headers "$TOK/third-party/re2/re2" "$VENDOR/re2/re2"
copy_headers "$TOK/third-party/abseil-cpp/absl" "$VENDOR/abseil-cpp/absl"
echo "tokenizers $(git -C "$TOK" rev-parse --short HEAD) (ExecuTorch $ET_TAG) headers in $VENDOR"
