// CosmoesDemoApp.swift: the app's entry point: the interactive demo, or a headless benchmark when launched with
// `cosmoes-bench key=value ...` (xcrun devicectl device process launch ...; the iOS counterpart of Android's BenchActivity).
import CosmoesKit
import SwiftUI

@main
struct CosmoesDemoApp: App {
    @State private var model = DemoModel()

    var body: some Scene {
        WindowGroup {
            if let bench = HeadlessBench.fromLaunchArguments(CommandLine.arguments) {
                HeadlessBenchView(bench: bench)
            } else {
                ContentView(model: model)
            }
        }
    }
}

/// `cosmoes-bench bundle=NAME prompt=FILE stats=FILE [policy= budget_mb= threads= gen= warmup= repeats=]`: relative
/// paths are under the app's Documents/ (bundle names under Documents/bundles/).
struct HeadlessBench {
    var arguments: [String: String?]

    static func fromLaunchArguments(_ argv: [String]) -> HeadlessBench? {
        guard let start = argv.firstIndex(of: "cosmoes-bench") else { return nil }
        var arguments: [String: String?] = [:]
        for word in argv[(start + 1)...] where !word.isEmpty {
            let parts = word.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            arguments[parts[0]] = parts.count == 2 ? parts[1] : nil
        }
        return HeadlessBench(arguments: arguments)
    }

    /// Runs BenchRun; the line the screen shows.
    func run() async -> String {
        do {
            var request = try BenchRun.fromArguments(arguments)
            let documents = BundleLibrary.documents
            request.bundleDir = BundleLibrary.resolve(request.bundleDir, under: documents.appendingPathComponent("bundles"))
            request.promptPath = BundleLibrary.resolve(request.promptPath, under: documents)
            request.statsPath = BundleLibrary.resolve(request.statsPath, under: documents)
            request.device = DeviceInfo.current(app: "CosmoesDemo cosmoes-bench")
            let ok = await BenchRun.run(request)
            return ok ? "done: \(request.statsPath)" : "failed: see \(request.statsPath)"
        } catch {
            return "error: \((error as? CosmoesError)?.message ?? error.localizedDescription)"
        }
    }
}

struct HeadlessBenchView: View {
    let bench: HeadlessBench
    @State private var status = "benchmarking…"

    var body: some View {
        Text(status)
            .font(.body.monospaced())
            .padding()
            .task { status = await bench.run() }
    }
}
