/// The one error type of the library: what went wrong, with the file and the
/// structure or field named. Messages never name a CLI flag or command: the CLI maps
/// each case to one line (`qimg: FILE: message`, with its own hints) and an exit code.
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
    /// Another process holds the image's locks; `readOnlyShareWorks`: opening without
    /// locks (read-only) would still work, the holder being a writer that allows readers.
    case inUse(path: String, holder: LockHolder, readOnlyShareWorks: Bool)
    /// An operation stopped part way: `cause` says why, `kept` what was kept and how to use it.
    case incomplete(path: String, cause: String, kept: String)
    /// A persistent bitmap is marked in use (a writer stopped without storing it): its
    /// bits cannot be trusted.
    case bitmapInconsistent(path: String, bitmap: String)
    /// A bitmap action failed (qemu-img's wording); `inconsistent` names the bitmap
    /// marked in use that made it fail, if that was the reason.
    case bitmapOperation(path: String, action: String, bitmap: String, reason: String, inconsistent: String?)
    /// The target exists and replacing it was not asked for.
    case targetExists(path: String)
    /// The image must be repaired before it can be written.
    case needsRepair(path: String, detail: String)
    /// Shrinking would cut off allocated data and was not asked for.
    case shrinkWouldLoseData(path: String)
    /// The file is in a format QEMU reads and qimg does not (`format` as QEMU names it);
    /// `probedAsRaw`: QEMU itself probes it as raw (a fixed-size VHD).
    case foreignFormat(path: String, format: String, probedAsRaw: Bool)
    /// Comparing `first` with `second` stopped at guest `offset`: `step` failed with
    /// `cause` (whose file is one of the two or of their backing chains).
    indirect case compareFailed(first: String, second: String, offset: UInt64, step: CompareStep, cause: QCow2Error)
    /// No internal snapshot has this ID or name.
    case snapshotNotFound(path: String, snapshot: String)

    /// Another run holds the backup repository's lock.
    case repositoryLocked(path: String)
    /// A backup repository's manifest or files are not what they must be.
    case repositoryDamaged(path: String, field: String, detail: String)
    /// A remote source (an NBD export, named by its URI) cannot be reached, refused a
    /// request or failed one; `detail` is the client library's account of it.
    case remote(path: String, detail: String)

    /// A live backup through a running QEMU's monitor (QMP socket `path`) failed: `problem`
    /// says how (callers tell the cases apart by it), `detail` QEMU's reason or ours.
    case live(path: String, problem: LiveProblem, detail: String)

    /// What went wrong in a live backup.
    public enum LiveProblem: Sendable, Equatable {
        /// The socket cannot be reached, or the session ended (QEMU gone, socket closed).
        case connection
        /// QEMU sent something that is not QMP, or refused a command it should accept.
        case protocolError
        /// No node, device or qdev of that name.
        case nodeNotFound
        /// The node has no bitmap of that name.
        case bitmapNotFound
        /// The bitmap does not record writes (disabled).
        case bitmapDisabled
        /// The bitmap is used by another job or an export.
        case bitmapBusy
        /// The bitmap was left in use by a QEMU that stopped without storing it.
        case bitmapInconsistent
        /// A backup job could not write its target (no space, an I/O error).
        case targetFailed
        /// A backup job ended with another error (e.g. a read error on the disk).
        case jobFailed
        /// The backup was cancelled (a signal): nothing was kept.
        case cancelled
        /// The guest agent's socket cannot be reached, or no agent answers on it in time.
        case agentUnavailable
        /// The guest agent refused or failed a command (it could not freeze or thaw the
        /// guest's filesystems).
        case agentFailed
    }

    /// What a comparison was doing when it failed (qemu-img tells them apart by exit status).
    public enum CompareStep: Sendable { case blockStatus, read }

    public var path: String {
        switch self {
        case .io(let p, _, _), .malformed(let p, _, _), .unsupported(let p, _),
             .backing(let p, _), .invalidArgument(let p, _), .mismatch(let p, _),
             .inUse(let p, _, _), .incomplete(let p, _, _), .bitmapInconsistent(let p, _),
             .bitmapOperation(let p, _, _, _, _), .targetExists(let p), .needsRepair(let p, _),
             .shrinkWouldLoseData(let p), .foreignFormat(let p, _, _), .snapshotNotFound(let p, _),
             .repositoryLocked(let p), .repositoryDamaged(let p, _, _), .remote(let p, _), .live(let p, _, _):
            return p
        case .compareFailed(_, _, _, _, let cause):
            return cause.path
        }
    }

    /// The message without the file name.
    public var message: String {
        switch self {
        case .io(_, let op, let e): return op == "open" ? errnoDescription(e) : "\(op) failed: \(errnoDescription(e))"
        case .malformed(_, let field, let detail): return field.isEmpty ? detail : "invalid \(field): \(detail)"
        case .unsupported(_, let d), .backing(_, let d), .invalidArgument(_, let d), .mismatch(_, let d),
             .needsRepair(_, let d), .remote(_, let d), .live(_, _, let d):
            return d
        case .incomplete(_, let cause, let kept):
            return cause + "; " + kept
        case .inUse(_, let holder, _):
            return "image is in use by \(holder)"
        case .bitmapInconsistent(_, let name):
            return "Bitmap '\(name)' is inconsistent and cannot be used"
        case .bitmapOperation(_, let action, let bitmap, let reason, _):
            return "Operation \(action) on bitmap \(bitmap) failed: \(reason)"
        case .targetExists:
            return "the target exists"
        case .shrinkWouldLoseData:
            return "the part being cut off holds data"
        case .foreignFormat(_, let name, let probedAsRaw):
            return probedAsRaw ? "looks like a fixed-size \(name) (VHD) image, which qimg does not support (qemu-img probes it as raw)"
                : "image format '\(name)' is not supported by qimg (qemu-img reads it)"
        case .compareFailed(_, _, _, _, let cause):
            return cause.message
        case .snapshotNotFound(_, let s):
            return "no snapshot '\(s)'"
        case .repositoryLocked:
            return "the repository is locked by another run"
        case .repositoryDamaged(_, let field, let detail):
            return field.isEmpty ? "repository damaged: \(detail)" : "repository damaged: invalid \(field): \(detail)"
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
        case .inUse(_, let h, let r): return .inUse(path: p, holder: h, readOnlyShareWorks: r)
        case .incomplete(_, let c, let k): return .incomplete(path: p, cause: c, kept: k)
        case .bitmapInconsistent(_, let b): return .bitmapInconsistent(path: p, bitmap: b)
        case .bitmapOperation(_, let a, let b, let r, let i): return .bitmapOperation(path: p, action: a, bitmap: b, reason: r, inconsistent: i)
        case .targetExists: return .targetExists(path: p)
        case .needsRepair(_, let d): return .needsRepair(path: p, detail: d)
        case .shrinkWouldLoseData: return .shrinkWouldLoseData(path: p)
        case .foreignFormat(_, let f, let r): return .foreignFormat(path: p, format: f, probedAsRaw: r)
        case .compareFailed(let a, let b, let o, let s, let c): return .compareFailed(first: a, second: b, offset: o, step: s, cause: c.withPath(p))
        case .snapshotNotFound(_, let s): return .snapshotNotFound(path: p, snapshot: s)
        case .repositoryLocked: return .repositoryLocked(path: p)
        case .repositoryDamaged(_, let f, let d): return .repositoryDamaged(path: p, field: f, detail: d)
        case .remote(_, let d): return .remote(path: p, detail: d)
        case .live(_, let k, let d): return .live(path: p, problem: k, detail: d)
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
