import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A process the test watches, signals or stops while it runs (qimg under SIGKILL/SIGTERM,
/// qemu-storage-daemon, a VM, qemu-io holding a lock); `Runner.run` is for processes that
/// run to their end. Started with posix_spawn, an empty signal mask and default signal
/// dispositions: test threads (and Foundation's Process, which passes their mask on) block
/// SIGINT and SIGTERM, and a child that inherits that mask would never see the signals the
/// tests send. The child gets no descriptor of ours but its stdin, stdout and stderr (as
/// with Process): a pipe or image another test has open is never held open by it.
/// stdout and stderr go to files, stdin is /dev/null or, with `stdinPipe`, a pipe that
/// stays open until `closeStdin()` (qemu-io waits on it).
public final class Spawned {
    public let pid: pid_t
    private let outPath: String
    private let errPath: String
    private var stdinWriter: Int32 = -1
    public private(set) var exited = false
    private var rawStatus: Int32 = 0
    public let command: String

    public init(_ executable: String, _ args: [String], cwd: String, stdinPipe: Bool = false) throws {
        let id = UUID().uuidString
        try FileManager.default.createDirectory(atPath: Paths.capture, withIntermediateDirectories: true)
        outPath = "\(Paths.capture)/spawn-\(id).out"
        errPath = "\(Paths.capture)/spawn-\(id).err"
        command = ([URL(fileURLWithPath: executable).lastPathComponent] + args).joined(separator: " ")

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        var stdinReader: Int32 = -1, writer: Int32 = -1
        if stdinPipe {
            var fds: [Int32] = [-1, -1]
            guard pipe(&fds) == 0 else { throw TestFailure("cannot start \(command): pipe errno \(errno)") }
            (stdinReader, writer) = (fds[0], fds[1])
            _ = fcntl(writer, F_SETFD, FD_CLOEXEC)
            posix_spawn_file_actions_adddup2(&actions, stdinReader, 0)
        } else {
            posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        }
        defer { if stdinReader >= 0 { close(stdinReader) } }
        posix_spawn_file_actions_addopen(&actions, 1, outPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, errPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        _ = Self.addCloseFrom?(&actions, 3)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in [SIGINT, SIGTERM, SIGPIPE, SIGHUP, SIGXFSZ] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        // /bin/sh changes to the working directory and execs the program (same pid).
        let argv = ["/bin/sh", "-c", "cd \"$0\" && exec \"$@\"", cwd, executable] + args
        let envp = Runner.environment.map { "\($0.key)=\($0.value)" }
        var cArgv: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        var cEnvp: [UnsafeMutablePointer<CChar>?] = envp.map { strdup($0) } + [nil]
        defer { cArgv.forEach { free($0) }; cEnvp.forEach { free($0) } }
        var child: pid_t = 0
        let rc = posix_spawn(&child, "/bin/sh", &actions, &attr, &cArgv, &cEnvp)
        guard rc == 0 else {
            if writer >= 0 { close(writer) }
            throw TestFailure("cannot start \(command): posix_spawn error \(rc)")
        }
        pid = child
        stdinWriter = writer
    }

    /// posix_spawn_file_actions_addclosefrom_np (glibc 2.34; the Glibc module hides it).
    private static let addCloseFrom: (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32)? = {
        guard let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") else { return nil }
        return unsafeBitCast(sym, to: (@convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32).self)
    }()

    deinit {
        closeStdin()
        if !exited { kill(pid, SIGKILL); wait(timeout: 30) }
        unlink(outPath)
        unlink(errPath)
    }

    public func send(_ sig: Int32) { if !exited { kill(pid, sig) } }

    /// Closes the write end of the stdin pipe (the child reads end of file).
    public func closeStdin() {
        if stdinWriter >= 0 { close(stdinWriter); stdinWriter = -1 }
    }

    /// Waits for the exit (and reaps the child), polling every `poll` seconds; false on timeout.
    @discardableResult public func wait(timeout: Double, poll: Double = 0.002) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while !exited {
            var st: Int32 = 0
            let r = waitpid(pid, &st, WNOHANG)
            if r == pid { rawStatus = st; exited = true; break }
            if r < 0 && errno != EINTR { exited = true; rawStatus = 0x7f00; break }
            if Date() > deadline { return false }
            usleep(useconds_t(poll * 1e6))
        }
        return true
    }

    /// Whether it still runs (a stopped process runs); reaps it once it has exited.
    public var isRunning: Bool { !wait(timeout: 0) }

    /// Exit status, or the signal number when `signaled`.
    public var status: Int32 { signaled ? rawStatus & 0x7f : (rawStatus >> 8) & 0xff }
    public var signaled: Bool { (rawStatus & 0x7f) != 0 && (rawStatus & 0x7f) != 0x7f }
    public var out: String { (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "" }
    /// Bytes written to stdout so far.
    public var outputBytes: Int {
        var st = stat()
        return stat(outPath, &st) == 0 ? Int(st.st_size) : 0
    }
    public var err: String { (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "" }
    public var stderrLines: [String] { err.split(separator: "\n").map(String.init) }
    public var summary: String { "`\(command)` -> \(signaled ? "killed by signal \(status)" : "exit \(status)")" }
}
