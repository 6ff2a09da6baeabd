// BenchRun.swift: the headless benchmark the demo app (launch arguments) and the XCTest benchmark run: warm-up +
// repeated generations, one statistics JSON per run with a "device" object, or {"error": line}; the files
// `cosmoes bench --device ios --stats FILE` reads.
import Foundation

public enum BenchRun {
    public struct Request: Sendable, Equatable {
        public var bundleDir: String
        /// Text, or token ids separated by spaces/commas (the prompt.txt `cosmoes bench` writes): ids run through
        /// generateIds, exactly `maxNewTokens` tokens as the runner does; text through generate (stops at end of text).
        public var promptPath: String
        public var statsPath: String
        public var policy: String = "swap"
        public var budgetMb: Double?
        public var threads: Int = 0
        public var maxNewTokens: Int = 32
        public var warmup: Int = 1
        public var repeats: Int = 3
        public var device: [String: String] = [:]

        public init(bundleDir: String, promptPath: String, statsPath: String, policy: String = "swap",
                    budgetMb: Double? = nil, threads: Int = 0, maxNewTokens: Int = 32, warmup: Int = 1,
                    repeats: Int = 3, device: [String: String] = [:]) {
            self.bundleDir = bundleDir
            self.promptPath = promptPath
            self.statsPath = statsPath
            self.policy = policy
            self.budgetMb = budgetMb
            self.threads = threads
            self.maxNewTokens = maxNewTokens
            self.warmup = warmup
            self.repeats = repeats
            self.device = device
        }
    }

    /// A request from key=value arguments (keys: bundle, prompt, stats, policy, budget_mb, threads, gen, warmup,
    /// repeats); a missing or bad value is a CosmoesError (status 1) naming the key.
    public static func fromArguments(_ args: [String: String?]) throws -> Request {
        let known: Set = ["bundle", "prompt", "stats", "policy", "budget_mb", "threads", "gen", "warmup", "repeats"]
        if let unknown = args.keys.sorted().first(where: { !known.contains($0) }) {
            throw CosmoesError("unknown benchmark argument '\(unknown)' (known: \(known.sorted().joined(separator: ", ")))",
                               .invalidArgument)
        }
        func text(_ key: String) throws -> String {
            guard let value = args[key] ?? nil, !value.isEmpty else {
                throw CosmoesError("benchmark argument '\(key)' is missing", .invalidArgument)
            }
            return value
        }
        func integer(_ key: String, _ fallback: Int, _ low: Int) throws -> Int {
            guard let raw = args[key] ?? nil else { return fallback }
            guard let value = Int(raw), value >= low else {
                throw CosmoesError("benchmark argument '\(key)' must be an integer >= \(low), got '\(raw)'",
                                   .invalidArgument)
            }
            return value
        }
        var budget: Double?
        if let raw = args["budget_mb"] ?? nil {
            guard let value = Double(raw), value.isFinite, value > 0 else {
                throw CosmoesError("benchmark argument 'budget_mb' must be a number > 0, got '\(raw)'",
                                   .invalidArgument)
            }
            budget = value
        }
        return Request(bundleDir: try text("bundle"), promptPath: try text("prompt"), statsPath: try text("stats"),
                       policy: (args["policy"] ?? nil) ?? "swap", budgetMb: budget,
                       threads: try integer("threads", 0, 0), maxNewTokens: try integer("gen", 32, 1),
                       warmup: try integer("warmup", 1, 0), repeats: try integer("repeats", 3, 1))
    }

    /// Runs the benchmark and writes its statistics JSON atomically to `statsPath`; on failure writes
    /// {"error": "<one line>"} there instead and returns false.
    @discardableResult
    public static func run(_ request: Request) async -> Bool {
        do {
            let json = try await measure(request)
            try write(json, to: request.statsPath)
            return true
        } catch {
            let line = (error as? CosmoesError)?.message ?? error.localizedDescription
            try? write(["error": line.replacingOccurrences(of: "\n", with: " ")], to: request.statsPath)
            return false
        }
    }

    static func measure(_ request: Request) async throws -> [String: Any] {
        let prompt = try readPrompt(request.promptPath)
        let options = SessionOptions(policy: request.policy, budgetMb: request.budgetMb, threads: request.threads)
        let session = try await CosmoesSession.open(bundle: URL(fileURLWithPath: request.bundleDir), options: options)
        let params = GenerationParams(maxNewTokens: request.maxNewTokens)
        var runs: [Stats] = []
        for index in 0..<(request.warmup + request.repeats) {
            let stats = try await generateOnce(session, prompt, params)
            if index >= request.warmup { runs.append(stats) }
        }
        await session.close()
        return try statistics(runs: runs, warmup: request.warmup, device: request.device, client: "ios-app",
                              promptKind: prompt.kind)
    }

    enum Prompt {
        case text(String), ids([Int32])
        var kind: String {
            switch self {
            case .text: return "text"
            case .ids: return "ids"
            }
        }
    }

    static func readPrompt(_ path: String) throws -> Prompt {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw CosmoesError("cannot read the prompt file \(path): \(error.localizedDescription)", .invalidArgument)
        }
        let words = text.split(whereSeparator: { $0 == " " || $0 == "," || $0.isNewline })
        let ids = words.compactMap { Int32($0) }
        return !ids.isEmpty && ids.count == words.count ? .ids(ids) : .text(text)
    }

    /// One generation, its stream drained; the session's statistics of it.
    static func generateOnce(_ session: CosmoesSession, _ prompt: Prompt, _ params: GenerationParams) async throws
        -> Stats
    {
        switch prompt {
        case .ids(let ids):
            _ = try await session.generateIds(ids, params: params)
        case .text(let text):
            for try await _ in session.generate(prompt: text, params: params) {}
        }
        guard let stats = await session.stats else {
            throw CosmoesError("the library returned no statistics after a generation", .runtimeError)
        }
        return stats
    }

    /// The statistics JSON of a benchmark, as `cosmoes_runner --stats-json` reports repeats: the last run's object,
    /// with speeds the medians over the runs (one slow run does not move them), expert traffic summed over them
    /// (expert_loads_decode: the median), the device, what ran it (`client`) and how the prompt went in ("text" or
    /// "ids"), as the Android app's BenchRun writes them.
    public static func statistics(runs: [Stats], warmup: Int, device: [String: String], client: String,
                                  promptKind: String) throws -> [String: Any] {
        guard let last = runs.last,
              var object = try JSONSerialization.jsonObject(with: Data(last.json.utf8)) as? [String: Any] else {
            throw CosmoesError("no statistics to write", .runtimeError)
        }
        let all = try runs.map { try JSONSerialization.jsonObject(with: Data($0.json.utf8)) as? [String: Any] ?? [:] }
        func numbers(_ key: String) -> [Double] { all.compactMap { ($0[key] as? NSNumber)?.doubleValue } }
        for key in ["ttft_ms", "prefill_tok_s", "decode_tok_s", "expert_loads_decode"] {
            object[key] = median(numbers(key))
        }
        object["decode_tok_s_runs"] = numbers("decode_tok_s")
        let loads = numbers("expert_loads").reduce(0, +), loadMs = numbers("expert_load_ms").reduce(0, +)
        object["expert_loads"] = Int(loads)
        let evictions = numbers("expert_evictions").reduce(0, +), evictMs = numbers("expert_evict_ms").reduce(0, +)
        object["expert_evictions"] = Int(evictions)
        object["expert_load_ms"] = loadMs
        object["expert_load_ms_mean"] = loads > 0 ? loadMs / loads : 0
        object["expert_evict_ms"] = evictMs
        object["expert_evict_ms_mean"] = evictions > 0 ? evictMs / evictions : 0
        object["warmup"] = warmup
        object["repeats"] = runs.count
        object["client"] = client
        object["prompt_kind"] = promptKind
        object["device"] = device.isEmpty ? DeviceInfo.current(app: "BenchRun") : device
        return object
    }

    static func median(_ values: [Double]) -> Double {
        let sorted = values.sorted()
        guard !sorted.isEmpty else { return 0 }
        let mid = sorted.count / 2
        return sorted.count % 2 == 1 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2
    }

    /// Writes a JSON object atomically (a temporary file renamed into place), creating the folder.
    public static func write(_ object: [String: Any], to path: String) throws {
        let url = URL(fileURLWithPath: path)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
        try (data + Data("\n".utf8)).write(to: url, options: .atomic)
    }
}
