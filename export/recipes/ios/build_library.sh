#!/usr/bin/env bash
# Builds the native runtime for iOS as Cosmoes.xcframework: one static libcosmoes.a per slice (iPhone arm64 and the
# arm64 simulator) holding the C API of include/cosmoes/cosmoes.h with everything under it (ExecuTorch, XNNPACK, the
# kernels, pytorch/tokenizers), its header and a module map, so Swift can `import Cosmoes`. ExecuTorch is built from
# source at the version of the venv's executorch wheel (else pyproject.toml's pin). Runs on macOS with Xcode; it has
# not been run in this project's CI, which reaches neither Xcode nor GitHub.
#
#   export/recipes/ios/build_library.sh [--out DIR] [--jobs N] [--help]
#
#   1. clones ExecuTorch at tag v<version> with its submodules into
#      $COSMOES_CACHE/executorch-v<version>/executorch (or reuses that checkout, or the one EXECUTORCH_SRC names: a
#      directory named executorch);
#   2. for each of ExecuTorch's presets `ios` and `ios-simulator` (its ios-cmake toolchain, PLATFORM and
#      DEPLOYMENT_TARGET): configures ExecuTorch with XNNPACK, the optimized and quantized kernels and the
#      module/data_loader/flat_tensor/named_data_map/tensor/threadpool extensions, and off what cosmoes does not use
#      (Core ML, MPS, the Objective-C/Swift and LLM extensions, TorchAO kernels); program verification and logging on
#      and XNNPACK's weight cache off, as in the wheel the runtime is tested with; builds and installs it into
#      $COSMOES_CACHE/executorch-v<version>/<preset>/install;
#   3. configures export/ for that slice (COSMOES_SHARED=OFF, the tokenizer from ExecuTorch's extension/llm/tokenizers
#      submodule with PCRE2 lookahead like the pytorch-tokenizers wheel), builds libcosmoes.a, and merges it with
#      every archive cosmoes_runner would link (read from CMake's file API) into one libcosmoes.a (libtool);
#   4. writes DIR (default build/ios):
#        DIR/Cosmoes.xcframework   ios-arm64 + ios-arm64-simulator: libcosmoes.a, Headers/cosmoes/cosmoes.h and
#                                  Headers/module.modulemap (module Cosmoes, links libc++)
#        DIR/include/              the same headers and module map
#      An app adds the xcframework and links it with -force_load $(BUILT_PRODUCTS_DIR)/libcosmoes.a (or -all_load):
#      the kernels and the XNNPACK delegate register themselves from static initialisers that nothing references.
#
# Environment: PYTHON (default .venv/bin/python, else python3: ExecuTorch's kernel code generation needs torch's
# torchgen and PyYAML); COSMOES_CACHE (default ~/.cache/cosmoes); EXECUTORCH_SRC (an existing ExecuTorch checkout of
# that version); COSMOES_ET_CMAKE_ARGS (extra -D options for ExecuTorch's configure).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
OUT=$ROOT/build/ios
JOBS=$( (sysctl -n hw.ncpu || nproc) 2> /dev/null || echo 4)
PRESETS=(ios ios-simulator)

die() {
  echo "ios/build_library.sh: $*" >&2
  exit 1
}
usage() { awk 'NR > 1 && /^set -euo pipefail/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; }

while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT=$2; shift 2 ;;
    --jobs) [ $# -ge 2 ] || die "--jobs needs a number"; JOBS=$2; shift 2 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac

# True when version $1 >= $2 (dotted numbers).
version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -t. -k1,1n -k2,2n -k3,3n | head -n1)" = "$2" ]; }

# --- prerequisites, each with one clear error -----------------------------------------------------------------------
[ "$(uname -s)" = Darwin ] || die "not macOS ($(uname -s)): the iOS build needs macOS with Xcode"
xcodebuild -version > /dev/null 2>&1 ||
  die "Xcode not found: install Xcode (the Command Line Tools alone have no iOS SDK) and select it with xcode-select -s"
xcrun --sdk iphoneos --show-sdk-path > /dev/null 2>&1 || die "the selected Xcode has no iOS SDK (xcrun --sdk iphoneos)"
command -v git > /dev/null || die "git not found: install git (it clones ExecuTorch and its submodules)"
command -v cmake > /dev/null || die "cmake not found: install CMake 3.25 or newer"
CMAKE_VERSION=$(cmake --version | sed -n '1s/^cmake version \([0-9][0-9.]*\).*/\1/p')
version_ge "$CMAKE_VERSION" 3.25 ||
  die "cmake $CMAKE_VERSION is too old: ExecuTorch's CMakePresets.json needs 3.25 or newer"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3 || true); fi
fi
if [ -z "$PY" ] || ! "$PY" -c 'import torchgen, yaml' 2> /dev/null; then
  die "no Python with torch and PyYAML (${PY:-python3}): ExecuTorch's kernel code generation needs them" \
    "(make setup, or set PYTHON)"
fi
# export/ is built with Ninja or Makefiles (ExecuTorch with its presets' Xcode generator): one configuration, so the
# file API names every archive by its real path.
if command -v ninja > /dev/null; then GENERATOR=Ninja; else GENERATOR="Unix Makefiles"; fi

# --- the ExecuTorch version: the venv's wheel, else pyproject.toml's pin ---------------------------------------------
. "$ROOT/export/recipes/executorch_version.sh"
ET_TAG=$(executorch_tag "$ROOT") || die "cannot tell the ExecuTorch version: no executorch in .venv and no executorch== pin in pyproject.toml"
ET_VERSION=${ET_TAG#v}

# --- 1. ExecuTorch sources ------------------------------------------------------------------------------------------
CACHE=${COSMOES_CACHE:-$HOME/.cache/cosmoes}
ET_SRC=${EXECUTORCH_SRC:-$CACHE/executorch-$ET_TAG/executorch}
# ExecuTorch's CMakeLists.txt refuses a checkout whose directory is not named exactly `executorch`.
[ "$(basename "$ET_SRC")" = executorch ] ||
  die "EXECUTORCH_SRC=$ET_SRC: ExecuTorch builds only from a directory named executorch"
if [ -e "$ET_SRC/.git" ]; then
  head=$(git -C "$ET_SRC" rev-parse HEAD)
  tagged=$(git -C "$ET_SRC" rev-parse -q --verify "refs/tags/$ET_TAG^{commit}" || true)
  have=$(tr -d '[:space:]' < "$ET_SRC/version.txt" 2> /dev/null || true)
  [ "$head" = "$tagged" ] || [ "$have" = "$ET_VERSION" ] ||
    die "$ET_SRC holds ExecuTorch ${have:-of another version}, not $ET_VERSION: check out $ET_TAG there, or remove it"
  echo "== reusing the ExecuTorch $ET_VERSION checkout $ET_SRC"
else
  [ ! -e "$ET_SRC" ] || die "$ET_SRC exists but is not a git checkout: remove it or set EXECUTORCH_SRC"
  echo "== cloning ExecuTorch $ET_TAG into $ET_SRC"
  mkdir -p "$(dirname "$ET_SRC")"
  git clone --depth 1 --branch "$ET_TAG" https://github.com/pytorch/executorch.git "$ET_SRC"
fi
git -C "$ET_SRC" submodule sync --recursive > /dev/null
git -C "$ET_SRC" submodule update --init --recursive --depth 1 --jobs 8 ||
  git -C "$ET_SRC" submodule update --init --recursive --jobs 8
TOKENIZERS_SRC=$ET_SRC/extension/llm/tokenizers
[ -f "$TOKENIZERS_SRC/CMakeLists.txt" ] || die "$TOKENIZERS_SRC is empty: the tokenizers submodule did not check out"

# A cache variable of one of ExecuTorch's configure presets (following `inherits`), ${sourceDir} expanded.
preset_var() {
  "$PY" - "$ET_SRC" "$1" "$2" << 'EOF'
import json, os, sys
src, name, var = sys.argv[1:]
presets = {p["name"]: p for p in json.load(open(os.path.join(src, "CMakePresets.json")))["configurePresets"]}
todo = [name]
while todo:
    preset = presets.get(todo.pop(0))
    if preset is None:
        continue
    value = preset.get("cacheVariables", {}).get(var)
    if value is not None:
        value = value["value"] if isinstance(value, dict) else value
        print(str(value).replace("${sourceDir}", src))
        sys.exit(0)
    inherits = preset.get("inherits", [])
    todo += [inherits] if isinstance(inherits, str) else inherits
sys.exit(f"ExecuTorch's preset {name} sets no {var}")
EOF
}

# Every archive the runner's link line names (CMake's file API, codemodel-v2), with libcosmoes.a first: what a
# program calling the C API needs. Other link items (system libraries) go to stderr as a note.
link_archives() {
  "$PY" - "$1" << 'EOF'
import glob, json, os, re, sys
build = sys.argv[1]
reply = os.path.join(build, ".cmake", "api", "v1", "reply")
index = json.load(open(sorted(glob.glob(os.path.join(reply, "index-*.json")))[-1]))
model = json.load(open(os.path.join(reply, index["reply"]["codemodel-v2"]["jsonFile"])))
targets = {t["name"]: json.load(open(os.path.join(reply, t["jsonFile"])))
           for t in model["configurations"][0]["targets"]}
paths = [targets["cosmoes"]["artifacts"][0]["path"]]
others = []
for fragment in targets["cosmoes_runner"]["link"]["commandFragments"]:
    found = re.findall(r"(?:^|[\s,])([^\s,]+\.a)(?=$|[\s,])", fragment["fragment"])
    paths += found
    if not found and fragment["role"] == "libraries" and fragment["fragment"].strip():
        others.append(fragment["fragment"].strip())
archives = []
for path in paths:
    path = os.path.realpath(os.path.join(build, path))
    if path not in archives:
        archives.append(path)
missing = [a for a in archives if not os.path.isfile(a)]
if missing:
    sys.exit("not built: " + " ".join(missing))
print("\n".join(archives))
if others:
    print("note: the app also links " + " ".join(others), file=sys.stderr)
EOF
}

BUILD_ROOT=$ROOT/build/ios-build
read -r -a ET_EXTRA <<< "${COSMOES_ET_CMAKE_ARGS:-}"
LIBRARIES=()
for preset in "${PRESETS[@]}"; do
  PLATFORM=$(preset_var "$preset" PLATFORM)
  DEPLOYMENT_TARGET=$(preset_var "$preset" DEPLOYMENT_TARGET)
  TOOLCHAIN=$(preset_var "$preset" CMAKE_TOOLCHAIN_FILE)
  [ -f "$TOOLCHAIN" ] || die "$TOOLCHAIN is missing: the ios-cmake submodule did not check out"

  # --- 2. ExecuTorch for this slice, installed ----------------------------------------------------------------------
  ET_WORK=$CACHE/executorch-$ET_TAG/$preset
  ET_INSTALL=$ET_WORK/install
  echo "== configuring ExecuTorch $ET_VERSION (preset $preset: $PLATFORM, iOS $DEPLOYMENT_TARGET) in $ET_WORK/build"
  cmake -S "$ET_SRC" -B "$ET_WORK/build" --preset "$preset" \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$ET_INSTALL" -DPYTHON_EXECUTABLE="$PY" \
    -DCMAKE_POLICY_VERSION_MINIMUM=3.5 \
    -DEXECUTORCH_BUILD_XNNPACK=ON -DEXECUTORCH_BUILD_KERNELS_OPTIMIZED=ON -DEXECUTORCH_BUILD_KERNELS_QUANTIZED=ON \
    -DEXECUTORCH_BUILD_EXTENSION_MODULE=ON -DEXECUTORCH_BUILD_EXTENSION_DATA_LOADER=ON \
    -DEXECUTORCH_BUILD_EXTENSION_FLAT_TENSOR=ON -DEXECUTORCH_BUILD_EXTENSION_NAMED_DATA_MAP=ON \
    -DEXECUTORCH_BUILD_EXTENSION_TENSOR=ON -DEXECUTORCH_BUILD_PTHREADPOOL=ON -DEXECUTORCH_BUILD_CPUINFO=ON \
    -DEXECUTORCH_BUILD_COREML=OFF -DEXECUTORCH_BUILD_MPS=OFF -DEXECUTORCH_BUILD_EXTENSION_APPLE=OFF \
    -DEXECUTORCH_BUILD_EXTENSION_IMAGE=OFF -DEXECUTORCH_BUILD_EXTENSION_LLM_APPLE=OFF \
    -DEXECUTORCH_BUILD_EXTENSION_LLM_RUNNER=OFF -DEXECUTORCH_BUILD_EXTENSION_LLM=OFF \
    -DEXECUTORCH_BUILD_KERNELS_LLM=OFF -DEXECUTORCH_BUILD_KERNELS_TORCHAO=OFF \
    -DEXECUTORCH_ENABLE_PROGRAM_VERIFICATION=ON -DEXECUTORCH_ENABLE_LOGGING=ON \
    -DEXECUTORCH_XNNPACK_ENABLE_WEIGHT_CACHE=OFF \
    ${ET_EXTRA[@]+"${ET_EXTRA[@]}"}
  echo "== building and installing ExecuTorch into $ET_INSTALL"
  rm -rf "$ET_INSTALL" # a fresh install: nothing left over from an earlier configuration
  cmake --build "$ET_WORK/build" --config Release -j "$JOBS" --target install

  ET_CONFIG=$(find "$ET_INSTALL" -name executorch-config.cmake -path '*/cmake/*' | head -n1)
  [ -n "$ET_CONFIG" ] || die "the ExecuTorch install in $ET_INSTALL has no executorch-config.cmake"
  ET_CONFIG_DIR=$(dirname "$ET_CONFIG")
  # The in-tree target names export/CMakeLists.txt links for a device build, checked here rather than at link time.
  missing=""
  for target in executorch extension_module_static extension_data_loader extension_tensor extension_threadpool \
    optimized_native_cpu_ops_lib quantized_ops_lib xnnpack_backend; do
    grep -q "add_library($target " "$ET_CONFIG_DIR"/ExecuTorchTargets*.cmake || missing="$missing $target"
  done
  [ -z "$missing" ] || die "the ExecuTorch install lacks the targets export/CMakeLists.txt links:$missing"

  # --- 3. libcosmoes.a for this slice, merged with everything under it ----------------------------------------------
  BUILD=$BUILD_ROOT/$preset
  echo "== configuring export/ for $PLATFORM in $BUILD"
  mkdir -p "$BUILD/.cmake/api/v1/query"
  touch "$BUILD/.cmake/api/v1/query/codemodel-v2"
  cmake -S "$ROOT/export" -B "$BUILD" -G "$GENERATOR" \
    -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" -DPLATFORM="$PLATFORM" -DDEPLOYMENT_TARGET="$DEPLOYMENT_TARGET" \
    -DCMAKE_BUILD_TYPE=Release -DCMAKE_POLICY_VERSION_MINIMUM=3.5 -DCOSMOES_SHARED=OFF \
    -Dexecutorch_DIR="$ET_CONFIG_DIR" -DCMAKE_PREFIX_PATH="$ET_INSTALL" -DCMAKE_FIND_ROOT_PATH_MODE_PACKAGE=BOTH \
    -DCMAKE_DISABLE_FIND_PACKAGE_tokenizers=ON \
    -DCOSMOES_TOKENIZERS_SOURCE_DIR="$TOKENIZERS_SRC" -DSUPPORT_REGEX_LOOKAHEAD=ON
  cmake --build "$BUILD" -j "$JOBS" --target cosmoes
  link_archives "$BUILD" > "$BUILD/archives.txt"
  ARCHIVES=()
  while IFS= read -r archive; do ARCHIVES+=("$archive"); done < "$BUILD/archives.txt"
  mkdir -p "$BUILD/merged"
  echo "== merging ${#ARCHIVES[@]} archives into $BUILD/merged/libcosmoes.a"
  xcrun libtool -static -no_warning_for_no_symbols -o "$BUILD/merged/libcosmoes.a" "${ARCHIVES[@]}"
  LIBRARIES+=(-library "$BUILD/merged/libcosmoes.a" -headers "$BUILD_ROOT/headers")
done

# --- 4. the xcframework ---------------------------------------------------------------------------------------------
HEADERS=$BUILD_ROOT/headers
rm -rf "$HEADERS"
mkdir -p "$HEADERS/cosmoes"
cp "$ROOT/export/include/cosmoes/cosmoes.h" "$HEADERS/cosmoes/"
cat > "$HEADERS/module.modulemap" << 'EOF'
module Cosmoes {
  header "cosmoes/cosmoes.h"
  link "c++"
  export *
}
EOF
mkdir -p "$OUT"
rm -rf "$OUT/Cosmoes.xcframework" "$OUT/include"
xcodebuild -create-xcframework "${LIBRARIES[@]}" -output "$OUT/Cosmoes.xcframework"
cp -R "$HEADERS" "$OUT/include"

cat << EOF

iOS build (ExecuTorch $ET_VERSION; slices ${PRESETS[*]}) in $OUT:
  $OUT/Cosmoes.xcframework   add to the app target; Other Linker Flags: -force_load \$(BUILT_PRODUCTS_DIR)/libcosmoes.a
  $OUT/include               cosmoes/cosmoes.h and module.modulemap (Swift: import Cosmoes)
EOF
