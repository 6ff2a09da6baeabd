// BenchmarkTests.swift: the XCTest benchmark: generations of a bundle measured with XCTest's clock, memory and CPU
// metrics plus tokens/s, written as the statistics JSON `cosmoes bench --device ios --stats` reads, both as an
// XCTAttachment and into the app container's Documents/cosmoes-bench/. Also the checks that need a real bundle.
//
// Configuration (xcodebuild passes TEST_RUNNER_<NAME>=value to the tests as <NAME>; ios_demo/README.md):
//   COSMOES_BUNDLE     a folder name under Documents/bundles, or a path (default: the first bundle there)
//   COSMOES_POLICY     all | swap | lru:N (default swap)      COSMOES_BUDGET_MB  a weight budget instead
//   COSMOES_GEN        new tokens per generation (default 32)  COSMOES_REPEATS    measured generations (default 5)
//   COSMOES_THREADS    CPU threads (default 0: the bundle's recipe)
//   COSMOES_PROMPT     the prompt text (default: the opening of Pride and Prejudice)
import CosmoesKit
import Foundation
import XCTest

final class BenchmarkTests: XCTestCase {
    func testGenerationThroughput() throws {
        let config = try BenchConfig.fromEnvironment()
        let session = try blocking { try await CosmoesSession.open(bundle: config.bundle, options: config.options) }
        defer { try? blocking { await session.close() } }
        let prompt = config.prompt, params = GenerationParams(maxNewTokens: config.gen)
        _ = try blocking { try await Self.generate(session, prompt, params, counter: nil) }  // warm-up: first loads

        let tokensPerSecond = TokensPerSecondMetric()
        let options = XCTMeasureOptions()
        options.iterationCount = config.repeats
        var runs: [Stats] = [], wall: [Double] = [], failure: Error?
        measure(metrics: [XCTClockMetric(), XCTMemoryMetric(), XCTCPUMetric(), tokensPerSecond], options: options) {
            let started = Date()
            do {
                let stats = try blocking { try await Self.generate(session, prompt, params, counter: tokensPerSecond) }
                runs.append(stats)
                wall.append(Double(stats.tokens.count) / Date().timeIntervalSince(started))
            } catch {
                failure = failure ?? error
            }
        }
        try record(config, runs: runs, wallTokS: wall, failure: failure)
        if let failure { throw failure }
    }

    func testUnknownPolicyNamesIt() throws {
        let config = try BenchConfig.fromEnvironment()
        XCTAssertThrowsError(try blocking {
            try await CosmoesSession.open(bundle: config.bundle, options: SessionOptions(policy: "most"))
        }) { error in
            XCTAssertEqual((error as? CosmoesError)?.kind, .invalidArgument, "\(error)")
            XCTAssertTrue("\(error)".contains("policy"), "\(error)")
        }
    }

    func testLeavingTheStreamStopsGeneration() throws {
        let config = try BenchConfig.fromEnvironment()
        let session = try blocking { try await CosmoesSession.open(bundle: config.bundle, options: config.options) }
        defer { try? blocking { await session.close() } }
        let params = GenerationParams(maxNewTokens: 48), prompt = config.prompt
        let full = try blocking { try await Self.generate(session, prompt, params, counter: nil) }.tokens.count
        try XCTSkipIf(full < 3, "the bundle ends this prompt after \(full) tokens: nothing to cut short")
        let cut: Int = try blocking {
            for try await _ in session.generate(prompt: prompt, params: params) { break }  // the first piece
            return await session.stats?.tokens.count ?? -1  // runs after the generation has returned
        }
        XCTAssertGreaterThan(cut, 0)
        XCTAssertLessThan(cut, full, "leaving the stream did not stop the generation")
    }

    // MARK: - helpers

    /// One generation with its stream drained (counting tokens for the tokens/s metric); its statistics.
    static func generate(_ session: CosmoesSession, _ prompt: String, _ params: GenerationParams,
                         counter: TokensPerSecondMetric?) async throws -> Stats {
        for try await _ in session.generate(prompt: prompt, params: params) {}
        guard let stats = await session.stats else { throw CosmoesError("no statistics after a generation", .runtimeError) }
        counter?.add(stats.tokens.count)
        return stats
    }

    /// The statistics JSON (BenchRun's: medians over the measured runs, the device) as an attachment and a file in
    /// Documents/cosmoes-bench/; {"error": line} when a run failed.
    private func record(_ config: BenchConfig, runs: [Stats], wallTokS: [Double], failure: Error?) throws {
        var object: [String: Any]
        if let failure {
            object = ["error": (failure as? CosmoesError)?.message ?? failure.localizedDescription]
        } else {
            object = try BenchRun.statistics(runs: runs, warmup: 1,
                                             device: DeviceInfo.current(app: "CosmoesKitTests.BenchmarkTests"),
                                             client: "ios-xctest", promptKind: "text")
            object["wall_tok_s"] = wallTokS.sorted()[wallTokS.count / 2]  // tokens over each run's wall time
        }
        let name = "\(config.bundle.lastPathComponent)-\(config.label).json"
        let path = BenchConfig.documents.appendingPathComponent("cosmoes-bench/\(name)").path
        try BenchRun.write(object, to: path)
        let attachment = XCTAttachment(contentsOfFile: URL(fileURLWithPath: path))
        attachment.name = name
        attachment.lifetime = .keepAlways
        add(attachment)
    }
}

/// What the benchmark runs, from the environment (see the top of this file).
struct BenchConfig {
    var bundle: URL
    var options: SessionOptions
    var gen: Int
    var repeats: Int
    var prompt: String

    static var documents: URL { FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0] }

    var label: String {
        (options.budgetMb.map { "budget\(Int($0))MB" } ?? options.policy).replacingOccurrences(of: ":", with: "_")
    }

    static func fromEnvironment() throws -> BenchConfig {
        let env = ProcessInfo.processInfo.environment
        func integer(_ key: String, _ fallback: Int) throws -> Int {
            guard let raw = env[key] else { return fallback }
            guard let value = Int(raw), value >= 0 else { throw CosmoesError("\(key)=\(raw) is not a count", .invalidArgument) }
            return value
        }
        var budget: Double?
        if let raw = env["COSMOES_BUDGET_MB"] {
            guard let value = Double(raw) else { throw CosmoesError("COSMOES_BUDGET_MB=\(raw) is not a number", .invalidArgument) }
            budget = value
        }
        let options = SessionOptions(policy: env["COSMOES_POLICY"] ?? "swap", budgetMb: budget,
                                     threads: try integer("COSMOES_THREADS", 0))
        return BenchConfig(bundle: try findBundle(env["COSMOES_BUNDLE"]), options: options,
                           gen: try integer("COSMOES_GEN", 32), repeats: max(1, try integer("COSMOES_REPEATS", 5)),
                           prompt: env["COSMOES_PROMPT"] ?? "It is a truth universally acknowledged, that a single man "
                               + "in possession of a good fortune, must be in want of a wife.")
    }

    /// COSMOES_BUNDLE (a name under Documents/bundles, or a path), else the first bundle there; none at all skips
    /// with how to copy one, a named one that is missing fails.
    static func findBundle(_ name: String?) throws -> URL {
        let root = documents.appendingPathComponent("bundles")
        if let name {
            let url = name.hasPrefix("/") ? URL(fileURLWithPath: name) : root.appendingPathComponent(name)
            guard FileManager.default.fileExists(atPath: url.appendingPathComponent("manifest.json").path) else {
                throw CosmoesError("COSMOES_BUNDLE=\(name): no bundle at \(url.path)", .badBundle)
            }
            return url
        }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: root.path)) ?? []
        let bundles = names.sorted().map { root.appendingPathComponent($0) }
            .filter { FileManager.default.fileExists(atPath: $0.appendingPathComponent("manifest.json").path) }
        guard let first = bundles.first else {
            throw XCTSkip("no bundle in \(root.path): copy one there (xcrun devicectl device copy to ... "
                          + "--domain-type appDataContainer --domain-identifier org.cosmoes.demo, ios_demo/README.md) "
                          + "or set COSMOES_BUNDLE")
        }
        return first
    }
}

/// Tokens per second over each measured iteration, next to XCTest's own metrics (the generation's tokens over the
/// iteration's time, set up and statistics included).
final class TokensPerSecondMetric: NSObject, XCTMetric, @unchecked Sendable {
    private let lock = NSLock()
    private var tokens = 0

    func add(_ count: Int) { lock.withLock { tokens += count } }

    // XCTest may copy a metric per iteration: every copy is this one, so the counts from the measured block land here
    func copy(with zone: NSZone? = nil) -> Any { self }

    func willBeginMeasuring() { lock.withLock { tokens = 0 } }

    func didStopMeasuring() {}

    func reportMeasurements(from startTime: XCTPerformanceMeasurementTimestamp,
                            to endTime: XCTPerformanceMeasurementTimestamp) throws -> [XCTPerformanceMeasurement] {
        let seconds = endTime.date.timeIntervalSince(startTime.date)
        let count = lock.withLock { tokens }
        return [XCTPerformanceMeasurement(identifier: "org.cosmoes.tokens-per-second", displayName: "Tokens/s",
                                          doubleValue: seconds > 0 ? Double(count) / seconds : 0, unitSymbol: "tok/s")]
    }
}

/// Runs async work to completion from a synchronous test (XCTest's measure block is synchronous). The work runs on
/// a detached task and the session's own queue, never on the thread that waits here.
func blocking<T>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
    let box = ResultBox<T>()
    let done = DispatchSemaphore(value: 0)
    Task.detached {
        do { box.result = .success(try await body()) } catch { box.result = .failure(error) }
        done.signal()
    }
    done.wait()
    return try box.result!.get()
}

private final class ResultBox<T>: @unchecked Sendable {
    var result: Result<T, Error>?
}
