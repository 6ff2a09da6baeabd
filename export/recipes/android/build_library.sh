#!/usr/bin/env bash
# Builds the native runtime for Android arm64-v8a: libcosmoes.so (the C API of include/cosmoes/cosmoes.h) for an
# app's jniLibs and cosmoes_runner for `cosmoes bench --device adb`, against ExecuTorch built from source (the
# version of the venv's executorch wheel, else pyproject.toml's pin; the Maven AAR exports only JNI symbols and no
# headers). Runs on a developer's machine (Linux or macOS) with the Android NDK r27+; it has not been run in this
# project's CI, which reaches neither the NDK nor GitHub.
#
#   export/recipes/android/build_library.sh [--out DIR] [--jobs N] [--help]
#
#   1. clones ExecuTorch at tag v<version> with its submodules into
#      $COSMOES_CACHE/executorch-v<version>/executorch (or reuses that checkout, or the one EXECUTORCH_SRC names: a
#      directory named executorch);
#   2. configures it with its own preset `android-arm64-v8a` (+ the NDK toolchain), switching on XNNPACK, the
#      optimized and quantized kernels and the module/data_loader/flat_tensor/named_data_map/tensor/threadpool
#      extensions and off what cosmoes does not use (JNI, LLM runner and tokenizers, training, devtools); program
#      verification and logging on as in the wheel the runtime is tested with; XNNPACK's weight cache and shared
#      workspace on, as ExecuTorch's android preset sets them (the wheel shares the workspace but has no weight
#      cache: -DEXECUTORCH_XNNPACK_ENABLE_WEIGHT_CACHE=OFF in COSMOES_ET_CMAKE_ARGS builds as the wheel does);
#      builds and installs it into $COSMOES_CACHE/executorch-v<version>/android-arm64-v8a/install;
#   3. configures export/ with the same toolchain against that install, the tokenizer from ExecuTorch's
#      extension/llm/tokenizers submodule (pytorch/tokenizers, with PCRE2 lookahead like the pytorch-tokenizers
#      wheel), builds and installs (stripped) into DIR (default build/android):
#        DIR/lib/arm64-v8a/libcosmoes.so      copy lib/ into the app's jniLibs (self-contained: ExecuTorch, the
#                                             tokenizer and libc++ are linked in statically; only cosmoes_* exported)
#        DIR/include/cosmoes/cosmoes.h
#        DIR/lib/arm64-v8a/cmake/cosmoes/     find_package(cosmoes) for an app's own CMake
#        DIR/bin/arm64-v8a/cosmoes_runner     for cosmoes bench BUNDLE --device adb --runner <this file>
#
# Environment: ANDROID_NDK (or ANDROID_NDK_HOME / ANDROID_NDK_ROOT) the NDK, r27 or newer (required);
# ANDROID_PLATFORM (default android-26, what ExecuTorch's own Android build uses); PYTHON (default .venv/bin/python,
# else python3: ExecuTorch's kernel code generation needs torch's torchgen and PyYAML); COSMOES_CACHE (default
# ~/.cache/cosmoes); EXECUTORCH_SRC (an existing ExecuTorch checkout of that version); COSMOES_ET_CMAKE_ARGS (extra
# -D options for ExecuTorch's configure, e.g. -DEXECUTORCH_XNNPACK_ENABLE_WEIGHT_CACHE=OFF).
set -euo pipefail

ABI=arm64-v8a
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
OUT=$ROOT/build/android
JOBS=$( (nproc || sysctl -n hw.ncpu) 2> /dev/null || echo 4)

die() {
  echo "android/build_library.sh: $*" >&2
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
command -v git > /dev/null || die "git not found: install git (it clones ExecuTorch and its submodules)"
command -v cmake > /dev/null || die "cmake not found: install CMake 3.25 or newer"
CMAKE_VERSION=$(cmake --version | sed -n '1s/^cmake version \([0-9][0-9.]*\).*/\1/p')
version_ge "$CMAKE_VERSION" 3.25 ||
  die "cmake $CMAKE_VERSION is too old: ExecuTorch's CMakePresets.json needs 3.25 or newer"
NDK=${ANDROID_NDK:-${ANDROID_NDK_HOME:-${ANDROID_NDK_ROOT:-}}}
[ -n "$NDK" ] || die "ANDROID_NDK is not set: point it at an Android NDK r27 or newer"
TOOLCHAIN=$NDK/build/cmake/android.toolchain.cmake
[ -f "$TOOLCHAIN" ] || die "ANDROID_NDK=$NDK is not an NDK: $TOOLCHAIN is missing"
NDK_REVISION=$(sed -n 's/^Pkg\.Revision *= *\([0-9.]*\).*/\1/p' "$NDK/source.properties" 2> /dev/null || true)
version_ge "${NDK_REVISION:-0}" 27 || die "the NDK at $NDK is r${NDK_REVISION:-?}: r27 or newer is needed"
command -v c++ > /dev/null || command -v clang++ > /dev/null || command -v g++ > /dev/null ||
  die "no host C++ compiler (c++, clang++ or g++): ExecuTorch builds its flatbuffers compiler for this machine"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3 || true); fi
fi
if [ -z "$PY" ] || ! "$PY" -c 'import torchgen, yaml' 2> /dev/null; then
  die "no Python with torch and PyYAML (${PY:-python3}): ExecuTorch's kernel code generation needs them" \
    "(make setup, or set PYTHON)"
fi
GENERATOR=() # bash 3.2 (macOS) calls an empty "${a[@]}" unbound under set -u: hence ${a[@]+"${a[@]}"} below
if command -v ninja > /dev/null; then GENERATOR=(-G Ninja); fi

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

# --- 2. ExecuTorch for Android, installed --------------------------------------------------------------------------
ET_WORK=$CACHE/executorch-$ET_TAG/android-$ABI
ET_INSTALL=$ET_WORK/install
read -r -a ET_EXTRA <<< "${COSMOES_ET_CMAKE_ARGS:-}"
echo "== configuring ExecuTorch $ET_VERSION (preset android-$ABI) in $ET_WORK/build"
cmake -S "$ET_SRC" -B "$ET_WORK/build" --preset "android-$ABI" ${GENERATOR[@]+"${GENERATOR[@]}"} \
  -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" -DANDROID_ABI="$ABI" -DANDROID_PLATFORM="${ANDROID_PLATFORM:-android-26}" \
  -DANDROID_STL=c++_static -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$ET_INSTALL" -DPYTHON_EXECUTABLE="$PY" \
  -DCMAKE_POLICY_VERSION_MINIMUM=3.5 \
  -DEXECUTORCH_BUILD_XNNPACK=ON -DEXECUTORCH_BUILD_KERNELS_OPTIMIZED=ON -DEXECUTORCH_BUILD_KERNELS_QUANTIZED=ON \
  -DEXECUTORCH_BUILD_EXTENSION_MODULE=ON -DEXECUTORCH_BUILD_EXTENSION_DATA_LOADER=ON \
  -DEXECUTORCH_BUILD_EXTENSION_FLAT_TENSOR=ON -DEXECUTORCH_BUILD_EXTENSION_NAMED_DATA_MAP=ON \
  -DEXECUTORCH_BUILD_EXTENSION_TENSOR=ON -DEXECUTORCH_BUILD_PTHREADPOOL=ON -DEXECUTORCH_BUILD_CPUINFO=ON \
  -DEXECUTORCH_BUILD_ANDROID_JNI=OFF -DEXECUTORCH_BUILD_EXTENSION_LLM=OFF -DEXECUTORCH_BUILD_EXTENSION_LLM_RUNNER=OFF \
  -DEXECUTORCH_BUILD_KERNELS_LLM=OFF -DEXECUTORCH_BUILD_EXTENSION_TRAINING=OFF -DEXECUTORCH_BUILD_DEVTOOLS=OFF \
  -DEXECUTORCH_ENABLE_PROGRAM_VERIFICATION=ON -DEXECUTORCH_ENABLE_LOGGING=ON \
  -DEXECUTORCH_XNNPACK_ENABLE_WEIGHT_CACHE=ON -DEXECUTORCH_XNNPACK_SHARED_WORKSPACE=ON \
  ${ET_EXTRA[@]+"${ET_EXTRA[@]}"}
echo "== building and installing ExecuTorch into $ET_INSTALL"
rm -rf "$ET_INSTALL" # a fresh install: nothing left over from an earlier configuration
cmake --build "$ET_WORK/build" -j "$JOBS" --target install

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

# --- 3. libcosmoes.so and cosmoes_runner ---------------------------------------------------------------------------
BUILD=$ROOT/build/android-build
echo "== configuring export/ for Android $ABI in $BUILD"
cmake -S "$ROOT/export" -B "$BUILD" ${GENERATOR[@]+"${GENERATOR[@]}"} \
  -DCMAKE_TOOLCHAIN_FILE="$TOOLCHAIN" -DANDROID_ABI="$ABI" -DANDROID_PLATFORM="${ANDROID_PLATFORM:-android-26}" \
  -DANDROID_STL=c++_static -DCMAKE_BUILD_TYPE=Release -DCMAKE_POLICY_VERSION_MINIMUM=3.5 \
  -Dexecutorch_DIR="$ET_CONFIG_DIR" -DCMAKE_PREFIX_PATH="$ET_INSTALL" -DCMAKE_FIND_ROOT_PATH_MODE_PACKAGE=BOTH \
  -DCMAKE_DISABLE_FIND_PACKAGE_tokenizers=ON \
  -DCOSMOES_TOKENIZERS_SOURCE_DIR="$TOKENIZERS_SRC" -DSUPPORT_REGEX_LOOKAHEAD=ON \
  -DCMAKE_INSTALL_PREFIX="$OUT" -DCMAKE_INSTALL_LIBDIR="lib/$ABI" -DCMAKE_INSTALL_BINDIR="bin/$ABI"
cmake --build "$BUILD" -j "$JOBS"
cmake --install "$BUILD" --strip

cat << EOF

Android $ABI build (ExecuTorch $ET_VERSION, ${ANDROID_PLATFORM:-android-26}) in $OUT:
  $OUT/lib/$ABI/libcosmoes.so   app: jniLibs (android.sourceSets.main.jniLibs.srcDirs += "$OUT/lib")
  $OUT/include/cosmoes/cosmoes.h
  $OUT/lib/$ABI/cmake/cosmoes   find_package(cosmoes) for an app's CMake
  $OUT/bin/$ABI/cosmoes_runner  cosmoes bench BUNDLE --device adb --runner $OUT/bin/$ABI/cosmoes_runner
EOF
