// swift-tools-version:5.9
// CosmoesKit: the CoSMoEs on-device runtime (export/runtime behind the C API of cosmoes.h) for Swift apps, with
// ExecuTorch and pytorch/tokenizers linked in. Used as a local package by ios_demo/CosmoesDemo (project.yml).
//
// How the native half gets in (ios_demo/README.md, "How the package links the runtime"), one of:
//   prebuilt     CCosmoes compiles export/runtime/*.cpp (reached through the symlinks Sources/CCosmoes/runtime and
//                Sources/CCosmoes/include/cosmoes: Swift PM refuses target and header paths outside the package,
//                local or remote, but follows symlinks inside it); ExecuTorch comes from its Swift PM binary
//                frameworks (branch swiftpm-1.5.1, the executorch==1.5.1 wheel's version); pytorch/tokenizers is the
//                libtokenizers.a inside the executorch_llm framework, compiled against the headers that
//                fetch_tokenizer_headers.sh puts in Sources/CCosmoes/vendor (no framework ships them).
//   xcframework  Frameworks/Cosmoes.xcframework, written by `export/recipes/ios/build_library.sh --out
//                ios_demo/CosmoesKit/Frameworks`: libcosmoes with ExecuTorch and the tokenizer built from source in
//                the configuration the runtime is tested with (program verification on, XNNPACK weight cache off).
// COSMOES_LINK=prebuilt|xcframework chooses; unset, xcframework is used when that directory exists.
import Foundation
import PackageDescription

let packageDir = Context.packageDirectory
let xcframeworkPath = "Frameworks/Cosmoes.xcframework"
let link = Context.environment["COSMOES_LINK"]
  ?? (FileManager.default.fileExists(atPath: "\(packageDir)/\(xcframeworkPath)") ? "xcframework" : "prebuilt")

// ExecuTorch's Swift PM branch for the release of the wheel the runtime is built and tested against
// (pyproject.toml: executorch==1.5.1); its branches are named swiftpm-<version> (swiftpm-<version>.<date> nightly).
let executorchBranch = "swiftpm-1.5.1"

// The library's version, as export/CMakeLists.txt takes it from pyproject.toml (cosmoes_version()).
func cosmoesVersion() -> String {
  let pyproject = (try? String(contentsOfFile: "\(packageDir)/../../pyproject.toml", encoding: .utf8)) ?? ""
  let line = pyproject.split(separator: "\n").first { $0.hasPrefix("version = ") }
  return line.map { String($0.dropFirst("version = ".count)).trimmingCharacters(in: CharacterSet(charactersIn: "\"")) }
    ?? "0.0.0"
}

// The kernels and the XNNPACK delegate register themselves from static initialisers nothing references: without
// -all_load the linker drops them and every program fails to load (ExecuTorch's "Linkage" documentation).
let forceLoad: [LinkerSetting] = [.unsafeFlags(["-Wl,-all_load"]), .linkedLibrary("c++")]

let ccosmoes: Target = .target(
  name: "CCosmoes",
  dependencies: [
    .product(name: "executorch", package: "executorch"),
    .product(name: "backend_xnnpack", package: "executorch"),
    .product(name: "kernels_optimized", package: "executorch"),
    .product(name: "kernels_quantized", package: "executorch"),
    // libtokenizers.a and what it needs (re2, abseil, pcre2, regex_lookahead, sentencepiece)
    .product(name: "executorch_llm", package: "executorch"),
  ],
  path: "Sources/CCosmoes",
  // tokenizer_log.cpp replaces the tokenizer library's logger only when it is the wheel's shared module (see
  // export/cmake/tokenizers.cmake); against the static library it would be a second definition
  // vendor/ holds headers only (reached through the search paths below): excluded, so Swift PM does not list its
  // thousands of files as unhandled
  exclude: ["runtime/tokenizer_log.cpp", "vendor", "config"],
  sources: ["runtime"],
  publicHeadersPath: "include",
  cxxSettings: [
    .headerSearchPath("runtime"),
    .headerSearchPath("vendor/tokenizers/include"),
    .headerSearchPath("vendor/json/single_include"),
    .headerSearchPath("vendor/re2"),
    .headerSearchPath("vendor/abseil-cpp"),
    // cosmoes_version(): the bare version token, made a string by config/cosmoes_version.h
    .define("COSMOES_VERSION_TOKEN", to: cosmoesVersion()),
    // as export/CMakeLists.txt: no fused multiply-add, so the weighted expert sums round like torch's and the
    // tokens match the Python runtime's
    .unsafeFlags(["-ffp-contract=off", "-Wno-deprecated-declarations",
                  "-include", "\(packageDir)/Sources/CCosmoes/config/cosmoes_version.h"]),
  ],
  linkerSettings: forceLoad
)

let cosmoesBinary: Target = .binaryTarget(name: "Cosmoes", path: xcframeworkPath)

let native: Target = link == "xcframework" ? cosmoesBinary : ccosmoes

let package = Package(
  name: "CosmoesKit",
  platforms: [.iOS(.v17), .macOS(.v14)],
  // dynamic: the app and its hosted test bundle share one copy of the runtime; two static copies would register
  // ExecuTorch's kernels and backend twice in one process
  products: [.library(name: "CosmoesKit", type: .dynamic, targets: ["CosmoesKit"])],
  dependencies: link == "xcframework" ? [] : [
    .package(url: "https://github.com/pytorch/executorch.git", branch: executorchBranch),
  ],
  targets: [
    native,
    .target(
      name: "CosmoesKit",
      dependencies: [.target(name: native.name)],
      path: "Sources/CosmoesKit",
      linkerSettings: link == "xcframework" ? forceLoad : []
    ),
    .testTarget(
      name: "CosmoesKitTests",
      dependencies: ["CosmoesKit"],
      path: "Tests/CosmoesKitTests"
    ),
  ],
  cxxLanguageStandard: .cxx17
)
