import QCow2
#if canImport(Glibc)
import Glibc
#endif

/// Exit codes and the one-line summary of the backup repository commands
/// (`backup --repo`, `repo ...`).
enum RepoExit {
    static let damaged: Int32 = 2
    static let locked: Int32 = 3
    static let sourceBusy: Int32 = 4
    static let ioError: Int32 = 5

    static let help = "Exit status: " + codes
    /// The exit codes of the repository commands (backup --repo's --help lists them too).
    static let codes = """
        0 success (a full backup taken instead of an incremental included: the \
        summary says why), 1 failure (a usage error included), 2 repository damaged (verify \
        found a problem, a manifest or point file is not as recorded), 3 the repository stayed \
        locked by another run for --lock-wait seconds (default \(Int(LockWaitOption.defaultSeconds)); the other run's files are \
        never touched), 4 the image is in use (a VM or another program holds it), 5 I/O \
        error or no space, 130/143 interrupted by SIGINT/SIGTERM.
        """

    static func code(_ e: QCow2Error) -> Int32 {
        switch e {
        case .repositoryDamaged: return damaged
        case .repositoryLocked: return locked
        case .inUse: return sourceBusy
        case .io: return ioError
        default: return 1
        }
    }

    /// The failure to throw for a library error.
    static func failure(_ error: Error, advice: ErrorText.Advice = ErrorText.Advice()) -> Error {
        guard let e = error as? QCow2Error else { return error }
        return CommandFailure(message: ErrorText.line(e, advice: advice), exitCode: code(e))
    }
}

/// Where a run's one-line summary goes: stderr, or appended to a log file.
struct RunLog {
    var file: String?

    func write(_ line: String) throws {
        guard let file else { Output.error(line); return }
        let fd = open(file, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw CommandFailure(message: "\(file): cannot open the log: \(String(cString: strerror(errno)))", exitCode: RepoExit.ioError) }
        defer { close(fd) }
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
    }
}

/// The permission bits of files qimg makes from an image (backup, convert): the image's
/// read and write bits, so that a copy is never readable by more users than the image.
enum FileModes {
    static func permissions(of path: String) -> mode_t {
        var st = stat()
        return stat(path, &st) == 0 ? st.st_mode & 0o666 : 0o600
    }
}
