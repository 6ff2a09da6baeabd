// ErrorTests.swift: bad input to CosmoesKit is a thrown CosmoesError with the library's one-line message, never a
// crash; these need no bundle, so they run wherever the package builds (swift test on a Mac, the app's test target).
import CosmoesKit
import Foundation
import XCTest

final class ErrorTests: XCTestCase {
    private var scratch: URL!

    override func setUpWithError() throws {
        scratch = FileManager.default.temporaryDirectory.appendingPathComponent("cosmoes-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: scratch)
    }

    private func openError(_ bundle: URL, _ options: SessionOptions = SessionOptions()) async -> CosmoesError? {
        do {
            let session = try await CosmoesSession.open(bundle: bundle, options: options)
            await session.close()
            return nil
        } catch {
            return error as? CosmoesError
        }
    }

    private func assertOneLine(_ error: CosmoesError?, contains: String, status: CosmoesError.Status,
                               file: StaticString = #filePath, line: UInt = #line) {
        guard let error else { return XCTFail("no CosmoesError thrown", file: file, line: line) }
        XCTAssertEqual(error.kind, status, error.message, file: file, line: line)
        XCTAssertFalse(error.message.isEmpty, file: file, line: line)
        XCTAssertFalse(error.message.contains("\n"), "not one line: \(error.message)", file: file, line: line)
        XCTAssertTrue(error.message.contains(contains), "'\(error.message)' lacks '\(contains)'", file: file, line: line)
    }

    func testMissingBundleThrowsBadBundle() async {
        let error = await openError(scratch.appendingPathComponent("no-such-bundle"))
        assertOneLine(error, contains: "bundle not found", status: .badBundle)
    }

    func testCorruptManifestThrowsNamingTheFile() async throws {
        try Data("{\"format\": ".utf8).write(to: scratch.appendingPathComponent("manifest.json"))
        let error = await openError(scratch)
        assertOneLine(error, contains: "manifest.json: invalid JSON", status: .badBundle)
    }

    // options are checked before the bundle is read (a bad policy needs a bundle: BenchmarkTests)
    func testNegativeBudgetIsTheCallersArgument() async {
        let error = await openError(scratch, SessionOptions(budgetMb: -1))
        assertOneLine(error, contains: "options.budget_mb", status: .invalidArgument)
    }

    func testThreadsOutOfRangeNamesTheOption() async {
        let error = await openError(scratch, SessionOptions(threads: -3))
        assertOneLine(error, contains: "threads", status: .invalidArgument)
    }

    func testBenchRunWritesTheErrorLine() async throws {
        let prompt = scratch.appendingPathComponent("prompt.txt")
        try Data("Once upon a time".utf8).write(to: prompt)
        let statsPath = scratch.appendingPathComponent("out/stats.json").path
        let request = BenchRun.Request(bundleDir: scratch.appendingPathComponent("missing").path,
                                       promptPath: prompt.path, statsPath: statsPath)
        let succeeded = await BenchRun.run(request)
        XCTAssertFalse(succeeded)
        let written = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: statsPath)))
        let line = try XCTUnwrap((written as? [String: Any])?["error"] as? String)
        XCTAssertTrue(line.contains("missing") && !line.contains("\n"), line)
    }

    func testBenchArgumentsNameTheBadKey() {
        XCTAssertThrowsError(try BenchRun.fromArguments(["bundle": "b", "prompt": "p", "stats": "s", "gen": "0"])) {
            XCTAssertTrue(($0 as? CosmoesError)?.message.contains("'gen'") == true, "\($0)")
        }
        XCTAssertThrowsError(try BenchRun.fromArguments(["bundle": "b", "prompt": "p", "stats": "s", "gens": "8"])) {
            XCTAssertTrue(($0 as? CosmoesError)?.message.contains("'gens'") == true, "\($0)")
        }
        XCTAssertThrowsError(try BenchRun.fromArguments(["prompt": "p", "stats": "s"])) {
            XCTAssertTrue(($0 as? CosmoesError)?.message.contains("'bundle'") == true, "\($0)")
        }
    }

    func testStatsParseNamesAMissingField() {
        XCTAssertThrowsError(try Stats.parse("{\"ttft_ms\": 1}")) {
            XCTAssertTrue(($0 as? CosmoesError)?.message.contains("missing field") == true, "\($0)")
        }
    }
}
