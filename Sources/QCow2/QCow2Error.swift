/// The one error type of the library: what went wrong, with the file and the
/// structure or field named, rendered by the CLI as `qimg: FILE: message`.
public enum QCow2Error: Error, Equatable, Sendable, CustomStringConvertible {
    /// A system call failed on `path`.
    case io(path: String, operation: String, errno: Int32)
    /// A metadata field read from disk is invalid.
    case malformed(path: String, field: String, detail: String)
    /// The image is valid but uses something qimg does not implement.
    case unsupported(path: String, detail: String)
    /// The backing chain cannot be opened (missing file, loop, bad format).
    case backing(path: String, detail: String)
    /// A caller-supplied argument is out of range.
    case invalidArgument(path: String, detail: String)
    /// Guest data did not match what was expected (qimg io read -P).
    case mismatch(path: String, detail: String)
    /// Another process holds the image's locks; `hint` says what still works.
    case inUse(path: String, holder: LockHolder, hint: String?)
    /// An operation stopped part way: `cause` says why, `kept` what was kept and how to use it.
    case incomplete(path: String, cause: String, kept: String)

    public var path: String {
        switch self {
        case .io(let p, _, _), .malformed(let p, _, _), .unsupported(let p, _),
             .backing(let p, _), .invalidArgument(let p, _), .mismatch(let p, _),
             .inUse(let p, _, _), .incomplete(let p, _, _):
            return p
        }
    }

    /// The message without the file name.
    public var message: String {
        switch self {
        case .io(_, let op, let e): return op == "open" ? errnoDescription(e) : "\(op) failed: \(errnoDescription(e))"
        case .malformed(_, let field, let detail): return field.isEmpty ? detail : "invalid \(field): \(detail)"
        case .unsupported(_, let d), .backing(_, let d), .invalidArgument(_, let d), .mismatch(_, let d):
            return d
        case .incomplete(_, let cause, let kept):
            return cause + "; " + kept
        case .inUse(_, let holder, let hint):
            return "image is in use by \(holder)" + (hint.map { "; " + $0 } ?? "")
        }
    }

    /// The same error about another file (e.g. a temporary file's error reported
    /// under the name the user gave).
    public func withPath(_ p: String) -> QCow2Error {
        switch self {
        case .io(_, let op, let e): return .io(path: p, operation: op, errno: e)
        case .malformed(_, let f, let d): return .malformed(path: p, field: f, detail: d)
        case .unsupported(_, let d): return .unsupported(path: p, detail: d)
        case .backing(_, let d): return .backing(path: p, detail: d)
        case .invalidArgument(_, let d): return .invalidArgument(path: p, detail: d)
        case .mismatch(_, let d): return .mismatch(path: p, detail: d)
        case .inUse(_, let h, let hint): return .inUse(path: p, holder: h, hint: hint)
        case .incomplete(_, let c, let k): return .incomplete(path: p, cause: c, kept: k)
        }
    }

    public var description: String { path.isEmpty ? message : "\(path): \(message)" }
}

/// A parse failure inside a pure parser, before a file name is known.
public struct FormatError: Error, Equatable, Sendable {
    public var field: String
    public var detail: String
    public init(_ field: String, _ detail: String) {
        self.field = field
        self.detail = detail
    }
    func at(_ path: String) -> QCow2Error { .malformed(path: path, field: field, detail: detail) }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

func errnoDescription(_ e: Int32) -> String {
    guard let s = strerror(e) else { return "errno \(e)" }
    return String(cString: s)
}
