import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// SIGINT and SIGTERM during a copy: the signal is recorded, the copy stops at the next
/// chunk, temporary files are removed, and qimg exits 128 + the signal number (130 for
/// SIGINT, 143 for SIGTERM), as a shell reports a process killed by it.
enum Interruption {
    /// The signal received, or 0.
    static let signal = Atomic<Int32>(0)

    static var requested: Bool { signal.load(ordering: .relaxed) != 0 }

    /// Installs the handlers (and unblocks the signals: a parent may have started us with
    /// them blocked).
    static func install() {
        Glibc.signal(SIGINT) { s in Interruption.signal.store(s, ordering: .relaxed) }
        Glibc.signal(SIGTERM) { s in Interruption.signal.store(s, ordering: .relaxed) }
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
    }

    /// The failure to report after an interrupted copy: `what` was not changed.
    static func failure(_ path: String, _ what: String) -> CommandFailure {
        let s = signal.load(ordering: .relaxed)
        let name = s == SIGTERM ? "SIGTERM" : "SIGINT"
        return CommandFailure(message: "\(path): interrupted by \(name); \(what)", exitCode: 128 + s)
    }
}
