// Options.swift: how a session opens (SessionOptions) and how one generation runs (GenerationParams), as the JSON
// objects the C API takes.
import Foundation

/// cosmoes_open's options: the expert-cache policy ("all", "swap", "lru:N") or a weight budget in MB that derives
/// it, CPU threads (0: the bundle's recipe), whether each program's sha256 is checked, and whether each layer's
/// experts start being read while the layer before runs (prefetch).
public struct SessionOptions: Sendable, Equatable {
    public var policy: String
    public var budgetMb: Double?
    public var threads: Int
    public var checkSha: Bool
    public var prefetch: Bool

    public init(policy: String = "swap", budgetMb: Double? = nil, threads: Int = 0, checkSha: Bool = true,
                prefetch: Bool = false) {
        self.policy = policy
        self.budgetMb = budgetMb
        self.threads = threads
        self.checkSha = checkSha
        self.prefetch = prefetch
    }

    /// The options JSON; the library checks every value and names a bad one.
    func json() -> String {
        var object: [String: Any] = ["policy": policy, "threads": threads, "check_sha": checkSha,
                                      "prefetch": prefetch]
        if let budgetMb { object["budget_mb"] = budgetMb }
        return encodeJSON(object)
    }
}

/// cosmoes_generate's parameters: new tokens, temperature (0: greedy), nucleus top-p and the sampling seed.
public struct GenerationParams: Sendable, Equatable {
    public var maxNewTokens: Int
    public var temperature: Double
    public var topP: Double
    public var seed: UInt64

    public init(maxNewTokens: Int = 64, temperature: Double = 0, topP: Double = 1, seed: UInt64 = 0) {
        self.maxNewTokens = maxNewTokens
        self.temperature = temperature
        self.topP = topP
        self.seed = seed
    }

    func json() -> String {
        encodeJSON(["max_new_tokens": maxNewTokens, "temperature": temperature, "top_p": topP, "seed": seed])
    }
}

/// A JSON object of plain values. A non-finite number (which JSON cannot hold) is written as a string, so the
/// library refuses it with a message naming the key instead of this process trapping.
func encodeJSON(_ object: [String: Any]) -> String {
    let safe = object.mapValues { value -> Any in
        if let number = value as? Double, !number.isFinite { return String(number) }
        return value
    }
    guard let data = try? JSONSerialization.data(withJSONObject: safe, options: [.sortedKeys]) else { return "{}" }
    return String(decoding: data, as: UTF8.self)
}
