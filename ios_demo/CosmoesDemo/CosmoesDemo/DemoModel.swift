// DemoModel.swift: the demo's state: the chosen bundle, policy and budget, the open session, the streamed output,
// live speed and memory while generating, and the library's statistics after each generation.
import CosmoesKit
import Foundation
import Observation

@MainActor
@Observable
final class DemoModel {
    /// Budget choices: none (the policy picker decides), auto (from os_proc_available_memory), or a fixed weight
    /// budget in MB.
    enum Budget: Hashable {
        case none, auto, megabytes(Double)
        static let choices: [Budget] = [.none, .auto] + [100.0, 200, 400, 800, 1600].map { Budget.megabytes($0) }
        var label: String {
            switch self {
            case .none: return "none"
            case .auto: return "auto"
            case .megabytes(let mb): return "\(Int(mb)) MB"
            }
        }
    }

    // the share of the memory iOS still lets the app take that "auto" gives to weights: the rest is for the KV
    // caches, activations, the app itself and headroom before jetsam
    static let autoBudgetShare = 0.6

    var bundles: [BundleEntry] = []
    var bundle: BundleEntry?
    var policy = "swap"
    var budget: Budget = .none
    var prompt = "It is a truth universally acknowledged, that"
    var maxNewTokens = 64
    var output = ""
    var error: String?
    var running = false
    var openedLabel = ""  // the bundle and options the open session has
    // live, while generating
    var liveTokS: Double?
    var liveTtftMs: Double?
    var footprintMB: Double?
    // the library's figures for the last generation
    var stats: Stats?

    private var session: CosmoesSession?
    private var sessionKey: String?
    private var generation: Task<Void, Never>?

    /// A bundle's first policy (swap for an MoE bundle) when another bundle is chosen.
    func bundleChanged() {
        policy = bundle?.policies.first ?? "swap"
    }

    func refreshBundles() {
        bundles = BundleLibrary.list()
        if bundle == nil || !bundles.contains(where: { $0 == bundle }) { bundle = bundles.first }
    }

    /// The weight budget to open with: nil when the policy picker decides.
    func budgetMB() -> Double? {
        switch budget {
        case .none: return nil
        case .megabytes(let mb): return mb
        case .auto: return ProcessMemory.availableMB().map { ($0 * Self.autoBudgetShare).rounded() }
        }
    }

    func start() {
        guard !running, let bundle else { return }
        running = true
        error = nil
        output = ""
        liveTokS = nil
        liveTtftMs = nil
        generation = Task { await run(bundle) }
    }

    func stop() {
        generation?.cancel()  // ends the stream: the next token callback stops the library
    }

    private func run(_ bundle: BundleEntry) async {
        defer { running = false }
        let memory = Task { await pollFootprint() }
        defer { memory.cancel() }
        do {
            let session = try await openSession(bundle)
            try await stream(session)
            stats = await session.stats
        } catch {
            self.error = (error as? CosmoesError)?.message ?? error.localizedDescription
        }
        footprintMB = ProcessMemory.footprintMB()
    }

    /// The open session, reopened when the bundle, policy or budget changed.
    private func openSession(_ bundle: BundleEntry) async throws -> CosmoesSession {
        let options = SessionOptions(policy: policy, budgetMb: budgetMB())
        let key = "\(bundle.url.path)|\(options.policy)|\(options.budgetMb.map { String($0) } ?? "-")"
        if let session, sessionKey == key { return session }
        await session?.close()
        session = nil
        let opened = try await CosmoesSession.open(bundle: bundle.url, options: options)
        session = opened
        sessionKey = key
        openedLabel = options.budgetMb.map { "\(bundle.name), budget \(Int($0)) MB" } ?? "\(bundle.name), \(options.policy)"
        return opened
    }

    /// Streams the text in; live speed counts pieces (about one per token) after the first.
    private func stream(_ session: CosmoesSession) async throws {
        let started = Date()
        var first: Date?
        var pieces = 0
        for try await piece in session.generate(prompt: prompt, params: GenerationParams(maxNewTokens: maxNewTokens)) {
            output += piece
            pieces += 1
            if let first {
                let seconds = Date().timeIntervalSince(first)
                if seconds > 0 { liveTokS = Double(pieces - 1) / seconds }
            } else {
                first = Date()
                liveTtftMs = Date().timeIntervalSince(started) * 1000
            }
        }
    }

    private func pollFootprint() async {
        while !Task.isCancelled {
            footprintMB = ProcessMemory.footprintMB()
            try? await Task.sleep(for: .milliseconds(500))
        }
    }
}
