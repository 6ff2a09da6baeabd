// BundleLibrary.swift: the bundles in the app's Documents/bundles (copied in with Finder or devicectl) and what
// the pickers need from each manifest (its experts, for the policy choices).
import Foundation

struct BundleEntry: Identifiable, Hashable {
    var url: URL
    var numExperts: Int  // 0: a dense bundle
    var topK: Int
    var id: URL { url }
    var name: String { url.lastPathComponent }

    /// all, swap, and lru:N for N = top_k, 2 top_k, ... below the expert count (the `cosmoes bench --sweep` set).
    var policies: [String] {
        guard numExperts > 0, topK > 0 else { return ["all"] }
        return ["swap"] + stride(from: topK, to: numExperts, by: topK).map { "lru:\($0)" } + ["all"]
    }
}

enum BundleLibrary {
    static var documents: URL { FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0] }
    static var root: URL { documents.appendingPathComponent("bundles") }

    /// Every folder of Documents/bundles with a manifest.json, by name. The manifest is read only for the pickers;
    /// the library checks it fully when a bundle opens.
    static func list() -> [BundleEntry] {
        try? FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        let names = (try? FileManager.default.contentsOfDirectory(atPath: root.path)) ?? []
        return names.sorted().compactMap { entry(root.appendingPathComponent($0)) }
    }

    static func entry(_ url: URL) -> BundleEntry? {
        guard let data = try? Data(contentsOf: url.appendingPathComponent("manifest.json")) else { return nil }
        let manifest = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
        let config = manifest?["config"] as? [String: Any]
        return BundleEntry(url: url, numExperts: config?["num_experts"] as? Int ?? 0, topK: config?["top_k"] as? Int ?? 0)
    }

    /// An absolute path as it is; a relative one under `base`.
    static func resolve(_ path: String, under base: URL) -> String {
        path.hasPrefix("/") ? path : base.appendingPathComponent(path).path
    }
}
