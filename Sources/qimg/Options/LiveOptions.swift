import ArgumentParser
import QCow2

/// `qimg backup`'s options for a running VM through its QEMU monitor (push mode).
struct LiveOptions: ParsableArguments {
    @Option(name: .customLong("qmp"), help: ArgumentHelp("Back up a running VM: the QMP socket of its QEMU (push mode; QEMU writes TARGET).", valueName: "socket")) var qmp: String?
    @Option(name: .customLong("node"), help: ArgumentHelp("With --qmp: the block node (or device/qdev id) to back up; once per disk.", valueName: "node")) var nodes: [String] = []
    @Option(name: .customLong("freeze"), help: ArgumentHelp("With --qmp: freeze the guest's filesystems through its QEMU guest agent (this socket) while the backup starts.", valueName: "socket")) var freeze: String?
    @Option(name: .customLong("qmp-timeout"), help: ArgumentHelp(
        "With --qmp: give up when QEMU leaves a command unanswered for this many seconds (a stopped or hung VM; default \(Int(QMPConnection.defaultReplyTimeout))).",
        valueName: "seconds")) var timeout: Double?

    /// The guest agent of --freeze (the library connects before it starts anything).
    var guestFreeze: GuestFreeze? { freeze.map { GuestFreeze(socket: $0) } }

    /// --qmp-timeout (a positive number of seconds), or the default.
    func timeoutSeconds(_ socket: String) throws -> Double {
        guard let t = timeout else { return QMPConnection.defaultReplyTimeout }
        guard t.isFinite, t > 0, t <= 1e6 else { throw CommandFailure(message: "\(socket): --qmp-timeout takes a positive number of seconds") }
        return t
    }
}

/// The exit codes of `qimg backup --qmp` and `--nbd`: one code per cause, the repository's
/// for the causes it shares (Docs/backup.md has the one table).
enum LiveExit {
    static let codes = """
        With --qmp or --nbd, the same codes (5: also a QEMU job that could not write its target), and: \
        10 the QMP socket cannot be reached or the session ended (or QEMU left a command unanswered for --qmp-timeout seconds), 11 QEMU refused a command, \
        12 no such node, 13 no such bitmap, 14 the bitmap is disabled, 15 the bitmap is in use, \
        16 the bitmap is inconsistent, 17 a backup job failed otherwise (a read error on the disk, \
        the point-in-time view ended during the copy), 18 the guest agent of --freeze cannot be reached \
        or does not answer, 19 it could not freeze or thaw the guest's filesystems.
        """

    /// A live-only cause's code, else the repository's (2 damaged, 3 locked, 4 in use,
    /// 5 I/O error or no space), else 1.
    static func code(for e: QCow2Error) -> Int32 {
        if case .live(_, let p, _) = e { return code(p) }
        return RepoExit.code(e)
    }

    static func code(_ p: QCow2Error.LiveProblem) -> Int32 {
        switch p {
        case .connection: return 10
        case .protocolError: return 11
        case .nodeNotFound: return 12
        case .bitmapNotFound: return 13
        case .bitmapDisabled: return 14
        case .bitmapBusy: return 15
        case .bitmapInconsistent: return 16
        case .targetFailed: return RepoExit.ioError
        case .jobFailed: return 17
        case .cancelled: return 1
        case .agentUnavailable: return 18
        case .agentFailed: return 19
        }
    }
}
