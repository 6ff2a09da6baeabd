# CMake toolchain file: cross-compiling export/ for 64-bit Arm Linux (aarch64, glibc) with Debian's
# g++-aarch64-linux-gnu; the result runs on an arm64 Linux machine or, here, under qemu-aarch64.
#
#   cmake -S export -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=export/recipes/linux-aarch64/toolchain.cmake \
#         -Dexecutorch_DIR=<unpacked aarch64 executorch wheel>/executorch/lib/cmake/executorch \
#         -DCOSMOES_TOKENIZERS_DIR=<unpacked aarch64 pytorch-tokenizers wheel>/pytorch_tokenizers
#
# `cosmoes native build --target linux-aarch64` does all of this (cosmoes/runtime/cross.py), wheels included.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(COSMOES_CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "prefix of the cross tools' names")
set(CMAKE_C_COMPILER "${COSMOES_CROSS_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${COSMOES_CROSS_PREFIX}g++")

# The target's libraries and headers (arm64 glibc, libstdc++): Debian puts them in /usr/aarch64-linux-gnu. Debian's
# cross g++ is configured with --with-sysroot=/ and finds them there by itself, so CMAKE_SYSROOT is left unset: a
# --sysroot=/usr/aarch64-linux-gnu would send it to /usr/aarch64-linux-gnu/usr/include, which does not exist.
set(COSMOES_AARCH64_SYSROOT "/usr/aarch64-linux-gnu" CACHE PATH "arm64 glibc and libstdc++ (qemu-aarch64 -L)")
set(CMAKE_FIND_ROOT_PATH "${COSMOES_AARCH64_SYSROOT}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)  # build tools run on this machine
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)  # never an x86 library from /usr/lib
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# The ExecuTorch CMake package lives in an unpacked wheel outside the sysroot (given as executorch_DIR or on
# CMAKE_PREFIX_PATH): packages are searched there as well. Its config locates headers and libraries relative to
# itself, not with find_library, so the ONLY modes above do not hide them.
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

# The binaries get their install RUNPATH ($ORIGIN-relative: export/CMakeLists.txt sets libcosmoes' $ORIGIN and the
# runner's $ORIGIN/../lib; others default to $ORIGIN) already in the build tree, never an absolute path of this
# machine (the unpacked wheels' directories): copied to a device, they find their libraries where they were laid
# out, or through LD_LIBRARY_PATH, not somewhere that only exists here.
set(CMAKE_BUILD_WITH_INSTALL_RPATH ON)
set(CMAKE_INSTALL_RPATH "$ORIGIN")
