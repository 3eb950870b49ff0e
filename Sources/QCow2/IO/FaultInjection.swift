// Fault injection below the library — a TESTING AID, compiled into debug builds only
// (QIMG_FAULT_INJECTION, set by Package.swift for the debug configuration): a release
// build has no injector, no hooks in `BlockFile` and no QIMG_FAULTS.
#if QIMG_FAULT_INJECTION
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

//
// Every byte the library reads or writes goes through `BlockFile`; when a
// `FaultInjector` is armed, `BlockFile` asks it, before each call, whether to fail
// the call (as the system would: `QCow2Error.io` with the errno), how many bytes the
// next pread/pwrite may transfer (short reads and writes), and whether to interrupt
// the system call once (EINTR). Injectors apply only to files whose path (as given
// to `BlockFile`) starts with their `pathPrefix`, so tests running in parallel each
// inject into their own directory. Disarmed, the cost is one relaxed atomic load and
// a predictable branch per call.
//
// The qimg command arms one injector from the environment variable QIMG_FAULTS
// (see `FaultPlan.init(specification:)`), for black-box tests only.
//
// An injector applies only inside its scope (`FaultInjector.scope`): a task-local
// binding, so there is no process-global state — tests running concurrently each see
// only the injectors of their own scope, and the qimg command runs its whole command
// inside the scope of the plan in QIMG_FAULTS. Threads the library starts itself (the
// compression workers) do no file I/O, so the scope covers every call of a command.

/// What to inject, and where.
public struct FaultPlan: Sendable, Equatable {
    /// A failing call: the `nth` matching call (1-based, counted from arming) fails
    /// with `errno`; with `sticky`, every later call of the same kind fails too (a
    /// full disk stays full); with `partial`, a failing write first writes its whole
    /// 4 KiB blocks before the middle of the request (what a file system may do when
    /// it runs out of space), never a part of a block.
    public struct Failure: Sendable, Equatable {
        public var nth: Int
        /// The errno, or `FaultPlan.kill`: the process kills itself with SIGKILL at that
        /// call (after the leading blocks of a `partial` write): a crash at an exact point.
        public var errno: Int32
        public var sticky: Bool
        public var partial: Bool

        public init(nth: Int, errno: Int32 = EIO, sticky: Bool = false, partial: Bool = false) {
            self.nth = nth
            self.errno = errno
            self.sticky = sticky
            self.partial = partial
        }
    }

    /// The "errno" of a failure that is a SIGKILL of the process instead.
    public static let kill: Int32 = -9

    /// Only files whose path starts with this (empty: every file).
    public var pathPrefix: String
    /// Fails a write: `BlockFile.write` or `truncate` (each call counts once).
    public var failWrite: Failure?
    /// Fails a sync: `BlockFile.sync` (fdatasync; not counted while `deferSync`
    /// skips it) or `fullSync` (fsync).
    public var failSync: Failure?
    /// Fails a read: `BlockFile.read` (each call counts once, whatever it reads).
    public var failRead: Failure?
    /// Each pread transfers at most a pseudo-random count in this range (deterministic).
    public var shortReads: ClosedRange<Int>?
    /// Each pwrite transfers at most a pseudo-random count in this range (deterministic).
    public var shortWrites: ClosedRange<Int>?
    /// Every pread, pwrite, fsync and fdatasync first fails once with EINTR.
    public var interrupt: Bool

    public init(pathPrefix: String = "", failWrite: Failure? = nil, failSync: Failure? = nil, failRead: Failure? = nil,
                shortReads: ClosedRange<Int>? = nil, shortWrites: ClosedRange<Int>? = nil, interrupt: Bool = false) {
        self.pathPrefix = pathPrefix
        self.failWrite = failWrite
        self.failSync = failSync
        self.failRead = failRead
        self.shortReads = shortReads
        self.shortWrites = shortWrites
        self.interrupt = interrupt
    }

    /// Parses the QIMG_FAULTS syntax: comma-separated items
    ///
    ///     write:N[:ERRNO][:sticky][:partial]   fail the Nth write (ERRNO: EIO, ENOSPC, EDQUOT, EROFS or a number; default EIO)
    ///                                          (ERRNO `kill`: SIGKILL the process there, after a partial write's blocks)
    ///     sync:N[:ERRNO][:sticky]              fail the Nth fsync/fdatasync
    ///     read:N[:ERRNO][:sticky]              fail the Nth read
    ///     short-reads:A-B   short-writes:A-B   transfer A..B bytes per pread/pwrite (or a single number)
    ///     eintr                                interrupt every system call once
    ///     prefix:PATH                          only files whose path starts with PATH
    ///
    /// e.g. `QIMG_FAULTS=write:5:ENOSPC:sticky` or `QIMG_FAULTS=sync:2,prefix:/tmp/t/`.
    public init(specification: String) throws {
        self.init()
        func bad(_ item: Substring) -> QCow2Error {
            .invalidArgument(path: "QIMG_FAULTS", detail: "cannot parse '\(item)'")
        }
        for item in specification.split(separator: ",") {
            let parts = item.split(separator: ":", omittingEmptySubsequences: false)
            switch parts[0] {
            case "write", "sync", "read":
                guard parts.count >= 2, let n = Int(parts[1]), n >= 1 else { throw bad(item) }
                var f = Failure(nth: n)
                for p in parts.dropFirst(2) {
                    switch p {
                    case "sticky": f.sticky = true
                    case "partial": f.partial = true
                    case "EIO": f.errno = EIO
                    case "ENOSPC": f.errno = ENOSPC
                    case "EDQUOT": f.errno = EDQUOT
                    case "EROFS": f.errno = EROFS
                    case "kill": f.errno = FaultPlan.kill
                    default:
                        guard let e = Int32(p), e > 0 else { throw bad(item) }
                        f.errno = e
                    }
                }
                switch parts[0] {
                case "write": failWrite = f
                case "sync": failSync = f
                default: failRead = f
                }
            case "short-reads", "short-writes":
                guard parts.count == 2 else { throw bad(item) }
                let bounds = parts[1].split(separator: "-").compactMap { Int($0) }
                guard (1...2).contains(bounds.count), bounds.allSatisfy({ $0 >= 1 }), bounds.first! <= bounds.last! else { throw bad(item) }
                if parts[0] == "short-reads" { shortReads = bounds.first!...bounds.last! } else { shortWrites = bounds.first!...bounds.last! }
            case "eintr":
                interrupt = true
            case "prefix":
                guard parts.count >= 2 else { throw bad(item) }
                pathPrefix = parts.dropFirst().joined(separator: ":")
            default:
                throw bad(item)
            }
        }
    }
}

/// A fault plan and what it has seen: armed inside `scope { ... }` only; read the
/// counters during or after.
public final class FaultInjector: Sendable {
    public let plan: FaultPlan

    struct State {
        var writes = 0
        var syncs = 0
        var reads = 0
        var injected = 0
        var random: UInt64 = 0x9E37_79B9_7F4A_7C15
        var interruptNext = true
        var writeFailing = false
        var syncFailing = false
        var readFailing = false
    }

    private let state = Mutex(State())

    public init(_ plan: FaultPlan) { self.plan = plan }

    /// Runs `body` with this injector armed (for files under `plan.pathPrefix`), on
    /// top of the injectors of any enclosing scope; the counters keep their values after.
    public func scope<R>(_ body: () throws -> R) rethrows -> R {
        try Self.$active.withValue(Self.active + [self]) { try body() }
    }

    /// The injector for the plan in the environment variable QIMG_FAULTS, if set (the
    /// qimg command runs inside its scope; a testing aid).
    public static func fromEnvironment() throws -> FaultInjector? {
        guard let raw = getenv("QIMG_FAULTS") else { return nil }
        let spec = String(cString: raw)
        guard !spec.isEmpty else { return nil }
        return FaultInjector(try FaultPlan(specification: spec))
    }

    /// Writes (`write` and `truncate` calls) seen since arming, the failed ones included.
    public var writes: Int { state.withLock { $0.writes } }
    /// Syncs (fsync, fdatasync) seen since arming, the failed ones included.
    public var syncs: Int { state.withLock { $0.syncs } }
    /// Read calls (`BlockFile.read`) seen since arming.
    public var reads: Int { state.withLock { $0.reads } }
    /// Failures injected (failed calls; short transfers and EINTRs are not counted).
    public var injected: Int { state.withLock { $0.injected } }

    // MARK: - Hooks called by BlockFile

    /// The injectors of the enclosing scopes, innermost last.
    @TaskLocal private static var active: [FaultInjector] = []

    /// The fast path: false unless the caller runs inside some injector's scope.
    @inline(__always) static var isArmed: Bool { !active.isEmpty }

    private static func matching(_ path: String) -> [FaultInjector] {
        active.filter { path.hasPrefix($0.plan.pathPrefix) }
    }

    /// A write of `count` bytes at `offset` is about to start: nil to go ahead, else the
    /// errno to fail with and how many leading bytes to write first.
    static func beforeWrite(_ path: String, offset: UInt64, count: Int) -> (errno: Int32, prefix: Int)? {
        var result: (Int32, Int)?
        for i in matching(path) {
            let fail = i.state.withLock { s -> Bool in
                s.writes += 1
                guard let f = i.plan.failWrite, s.writes == f.nth || (f.sticky && s.writeFailing) else { return false }
                s.writeFailing = true
                s.injected += 1
                return true
            }
            if fail, let f = i.plan.failWrite, result == nil {
                var prefix = 0
                if f.partial {
                    let mid = (offset + UInt64(count / 2)) & ~UInt64(4095)
                    if mid > offset { prefix = Int(mid - offset) }
                }
                result = (f.errno, prefix)
            }
        }
        return result
    }

    /// A sync is about to start: nil to go ahead, else the errno to fail with.
    static func beforeSync(_ path: String) -> Int32? {
        var result: Int32?
        for i in matching(path) {
            let fail = i.state.withLock { s -> Bool in
                s.syncs += 1
                guard let f = i.plan.failSync, s.syncs == f.nth || (f.sticky && s.syncFailing) else { return false }
                s.syncFailing = true
                s.injected += 1
                return true
            }
            if fail, let f = i.plan.failSync, result == nil { result = f.errno }
        }
        return result
    }

    /// A read call is about to start (counted once per `BlockFile.read`): nil to go
    /// ahead, else the errno to fail with.
    static func beforeRead(_ path: String) -> Int32? {
        var result: Int32?
        for i in matching(path) {
            let fail = i.state.withLock { s -> Bool in
                s.reads += 1
                guard let f = i.plan.failRead, s.reads == f.nth || (f.sticky && s.readFailing) else { return false }
                s.readFailing = true
                s.injected += 1
                return true
            }
            if fail, let f = i.plan.failRead, result == nil { result = f.errno }
        }
        return result
    }

    enum Transfer { case read, write, sync }

    /// Before one system call: whether to fail it with EINTR (once, then the retry goes
    /// through), and the most bytes it may transfer.
    static func syscall(_ kind: Transfer, _ path: String, count: Int) -> (interrupt: Bool, count: Int) {
        var interrupt = false
        var n = count
        for i in matching(path) {
            let p = i.plan
            let range = kind == .read ? p.shortReads : kind == .write ? p.shortWrites : nil
            i.state.withLock { s in
                if p.interrupt {
                    if s.interruptNext { interrupt = true }
                    s.interruptNext.toggle()
                }
                if let r = range {
                    // xorshift64: deterministic per injector.
                    s.random ^= s.random << 13
                    s.random ^= s.random >> 7
                    s.random ^= s.random << 17
                    let span = UInt64(r.upperBound - r.lowerBound + 1)
                    n = min(n, r.lowerBound + Int(s.random % span))
                }
            }
        }
        return (interrupt, max(1, n))
    }
}
#endif
