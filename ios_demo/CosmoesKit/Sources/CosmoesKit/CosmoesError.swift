// CosmoesError.swift: the error every CosmoesKit call throws, carrying the C library's one-line message and status.
#if canImport(CCosmoes)
import CCosmoes
#else
import Cosmoes
#endif
import Foundation

/// A refusal or failure of the runtime: `message` is `cosmoes_last_error()` (one line naming the file, field or
/// value), `status` the `cosmoes_status` of the call (see `Status`).
public struct CosmoesError: Error, LocalizedError, CustomStringConvertible, Equatable, Sendable {
    /// The statuses of cosmoes.h.
    public enum Status: Int, Sendable {
        case invalidArgument = 1, badBundle = 2, tooLong = 3, runtimeError = 4, closed = 5
    }

    public let message: String
    public let status: Int

    public init(message: String, status: Int) {
        self.message = message
        self.status = status
    }

    public init(_ message: String, _ status: Status) {
        self.init(message: message, status: status.rawValue)
    }

    public var kind: Status? { Status(rawValue: status) }
    public var errorDescription: String? { message }
    public var description: String { message }

    /// The calling thread's last error after a call returned `status` (read on the same thread: it is thread-local).
    static func last(_ status: Int32) -> CosmoesError {
        CosmoesError(message: String(cString: cosmoes_last_error()), status: Int(status))
    }

    /// cosmoes_open returns NULL without a status: the library reports the caller's options (an unknown key, a value
    /// out of range, a policy or budget the bundle cannot take) as `options...` or naming the policy or budget, as
    /// capi.cpp classifies them; anything else is the bundle's fault.
    static func lastOpen() -> CosmoesError {
        let message = String(cString: cosmoes_last_error())
        let caller = message.hasPrefix("options") || message.contains("expert cache policy")
            || message.contains("budget")
        return CosmoesError(message, caller ? .invalidArgument : .badBundle)
    }

    static let closedSession = CosmoesError("the session is closed", .closed)
}
