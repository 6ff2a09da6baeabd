// Stats.swift: the statistics JSON of the last generation (the schema of cosmoes_stats_json and
// `cosmoes_runner --stats-json`), decoded into the fields the app shows; the whole object is kept in `json`.
import Foundation

public struct Stats: Codable, Sendable, Equatable {
    public var ttftMs: Double
    public var prefillTokS: Double
    public var decodeTokS: Double
    public var peakRssMb: Double
    public var expertLoads: Int
    public var expertEvictions: Int
    /// Experts resident in each MoE layer when the generation ended.
    public var residentPerLayer: [Int]
    /// The generated token ids.
    public var tokens: [Int]
    /// The JSON object as the library wrote it, every other field included (ExRep, arenas, the decode breakdown).
    public internal(set) var json: String = ""

    // tests/bench/test_ios.py checks that each key here is a key of the library's statistics JSON
    enum CodingKeys: String, CodingKey {
        case ttftMs = "ttft_ms"
        case prefillTokS = "prefill_tok_s"
        case decodeTokS = "decode_tok_s"
        case peakRssMb = "peak_rss_mb"
        case expertLoads = "expert_loads"
        case expertEvictions = "expert_evictions"
        case residentPerLayer = "resident_per_layer"
        case tokens
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        ttftMs = try c.decode(Double.self, forKey: .ttftMs)
        prefillTokS = try c.decode(Double.self, forKey: .prefillTokS)
        decodeTokS = try c.decode(Double.self, forKey: .decodeTokS)
        peakRssMb = try c.decode(Double.self, forKey: .peakRssMb)
        expertLoads = try c.decode(Int.self, forKey: .expertLoads)
        expertEvictions = try c.decode(Int.self, forKey: .expertEvictions)
        // a dense bundle has no MoE layer; a library older than the key writes none: an empty list either way
        residentPerLayer = try c.decodeIfPresent([Int].self, forKey: .residentPerLayer) ?? []
        tokens = try c.decode([Int].self, forKey: .tokens)
    }

    /// Decodes the library's statistics JSON; a field missing or of the wrong type is a one-line CosmoesError.
    public static func parse(_ json: String) throws -> Stats {
        do {
            var stats = try JSONDecoder().decode(Stats.self, from: Data(json.utf8))
            stats.json = json
            return stats
        } catch let error as DecodingError {
            throw CosmoesError("statistics JSON: \(describe(error))", .runtimeError)
        }
    }

    private static func describe(_ error: DecodingError) -> String {
        switch error {
        case .keyNotFound(let key, _):
            return "missing field '\(key.stringValue)'"
        case .typeMismatch(_, let context), .valueNotFound(_, let context):
            let path = context.codingPath.map(\.stringValue).joined(separator: ".")
            return "field '\(path)': \(context.debugDescription)"
        case .dataCorrupted(let context):
            return "not JSON (\(context.underlyingError?.localizedDescription ?? context.debugDescription))"
        @unknown default:
            return String(describing: error)
        }
    }
}
