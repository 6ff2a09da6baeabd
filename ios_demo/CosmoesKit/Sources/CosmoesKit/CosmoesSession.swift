// CosmoesSession.swift: one opened bundle as an actor over the C API: streamed text generation with cancellation,
// id-level generation, the last generation's statistics, reset and close.
#if canImport(CCosmoes)
import CCosmoes
#else
import Cosmoes
#endif
import Foundation
import os

/// A bundle opened with `cosmoes_open`. The actor runs on its own serial dispatch queue, so the C calls, which block
/// for a whole generation, never hold a thread of Swift's cooperative pool (the Kotlin API's single-thread
/// dispatcher); one call runs at a time, and `close()` waits for a running generation.
public actor CosmoesSession {
    private let queue: DispatchSerialQueue
    private var handle: Handle?
    /// The statistics of the last generation (nil before the first).
    public private(set) var stats: Stats?

    public nonisolated var unownedExecutor: UnownedSerialExecutor { queue.asUnownedSerialExecutor() }

    private init(handle: Handle, queue: DispatchSerialQueue) {
        self.handle = handle
        self.queue = queue
    }

    deinit {
        if let handle { cosmoes_close(handle.raw) }
    }

    /// The library's version, e.g. "0.3.0".
    public static var version: String { String(cString: cosmoes_version()) }

    /// Opens a bundle directory (reads and checks its manifest, verifies its programs, loads the backbone and the
    /// tokenizer) on the session's own queue. Throws `CosmoesError` with the library's message.
    public static func open(bundle: URL, options: SessionOptions = SessionOptions()) async throws -> CosmoesSession {
        let queue = DispatchSerialQueue(label: "org.cosmoes.session", qos: .userInitiated)
        let optionsJSON = options.json()
        let path = bundle.path
        let opened: Handle = try await withCheckedThrowingContinuation { continuation in
            queue.async {
                if let raw = cosmoes_open(path, optionsJSON) {
                    continuation.resume(returning: Handle(raw: raw))
                } else {
                    continuation.resume(throwing: CosmoesError.lastOpen())  // read on the thread that failed
                }
            }
        }
        return CosmoesSession(handle: opened, queue: queue)
    }

    /// Continues `prompt`, yielding the text of each token as it is decoded ("" pieces, a character still in
    /// progress, are left out). Generation starts at once; ending the iteration early (a `break`, or cancelling the
    /// task that iterates) makes the next token callback return non-zero, which stops the library. Errors are
    /// `CosmoesError`. `stats` is updated when the generation ends.
    public nonisolated func generate(prompt: String, params: GenerationParams = GenerationParams())
        -> AsyncThrowingStream<String, Error>
    {
        AsyncThrowingStream { continuation in
            let stop = StopFlag()
            let task = Task { await self.stream(prompt: prompt, params: params, into: continuation, stop: stop) }
            continuation.onTermination = { _ in
                stop.raise()
                task.cancel()
            }
        }
    }

    /// The id-level variant (no tokenizer, no end-of-text stop): exactly `params.maxNewTokens` ids after
    /// `promptIds`.
    public func generateIds(_ promptIds: [Int32], params: GenerationParams = GenerationParams()) throws -> [Int32] {
        let handle = try openHandle()
        // the library refuses max_new_tokens outside 1...2^20 by name before it writes anything: size the buffer so
        // that no value can trap here first
        var out = [Int32](repeating: 0, count: min(max(params.maxNewTokens, 1), 1 << 20))
        var count = 0
        let status = promptIds.withUnsafeBufferPointer { prompt in
            out.withUnsafeMutableBufferPointer { buffer in
                cosmoes_generate_ids(handle, prompt.baseAddress, prompt.count, params.json(), buffer.baseAddress,
                                     buffer.count, &count)
            }
        }
        guard status == 0 else { throw CosmoesError.last(status) }
        try refreshStats()
        return Array(out.prefix(count))
    }

    /// Forgets the current sequence and the routing history (resident experts stay loaded).
    public func reset() {
        if let handle { cosmoes_reset(handle.raw) }
    }

    /// Releases the session and everything it loaded; runs after a generation in progress. Idempotent.
    public func close() {
        if let handle { cosmoes_close(handle.raw) }
        handle = nil
    }

    // MARK: - internals

    private func openHandle() throws -> OpaquePointer {
        guard let handle else { throw CosmoesError.closedSession }
        return handle.raw
    }

    private func stream(prompt: String, params: GenerationParams,
                        into continuation: AsyncThrowingStream<String, Error>.Continuation, stop: StopFlag) {
        do {
            let handle = try openHandle()
            if stop.isRaised {  // cancelled before it started
                continuation.finish()
                return
            }
            let sink = PieceSink(continuation: continuation, stop: stop)
            let status = withExtendedLifetime(sink) {
                cosmoes_generate(handle, prompt, params.json(), deliverPiece, Unmanaged.passUnretained(sink).toOpaque())
            }
            guard status == 0 else { throw CosmoesError.last(status) }
            try refreshStats()
            continuation.finish()
        } catch {
            continuation.finish(throwing: error)
        }
    }

    private func refreshStats() throws {
        guard let handle, let raw = cosmoes_stats_json(handle.raw) else { return }
        defer { cosmoes_free(raw) }
        stats = try Stats.parse(String(cString: raw))
    }
}

/// An opened cosmoes_session pointer (used only on the session's queue, or in deinit when nothing else can).
private struct Handle: @unchecked Sendable {
    let raw: OpaquePointer
}

/// Set from any thread when the consumer goes away; read by the token callback on the session's queue.
final class StopFlag: @unchecked Sendable {
    private let lock = OSAllocatedUnfairLock(initialState: false)
    var isRaised: Bool { lock.withLock { $0 } }
    func raise() { lock.withLock { $0 = true } }
}

/// What the C callback reaches through its `user` pointer: the stream to yield into and the stop flag.
private final class PieceSink {
    let continuation: AsyncThrowingStream<String, Error>.Continuation
    let stop: StopFlag

    init(continuation: AsyncThrowingStream<String, Error>.Continuation, stop: StopFlag) {
        self.continuation = continuation
        self.stop = stop
    }

    /// False stops generation: the consumer is gone.
    func deliver(_ piece: UnsafePointer<CChar>?) -> Bool {
        if stop.isRaised { return false }
        guard let piece, piece.pointee != 0 else { return true }
        if case .terminated = continuation.yield(String(cString: piece)) { return false }
        return true
    }
}

/// The cosmoes_token_callback: a plain function, so Swift passes it as a C function pointer.
private func deliverPiece(_ piece: UnsafePointer<CChar>?, _ id: Int32, _ user: UnsafeMutableRawPointer?) -> Int32 {
    guard let user else { return 1 }
    return Unmanaged<PieceSink>.fromOpaque(user).takeUnretainedValue().deliver(piece) ? 0 : 1
}
