// The TestSupport target (Tests/Support), shared by both test targets, which
// `import TestSupport`. Keep it free of target-specific code.
//
// What it provides (this file; the others of Tests/Support are named for what they hold):
//  * Env       - CI detection and the QEMU tools on PATH;
//  * Runner    - runs a process under a CPU-time limit, capturing stdout/stderr;
//  * PipedProcess - a background child that tells, on a pipe, when it is ready;
//  * lockHeld  - whether another process holds a lock on a byte of a file;
//  * Fixtures  - generates the fixture images ONCE per test process (even
//                across the two test modules, which share one process) and
//                parses manifest.tsv, corrupt.tsv and malformed.tsv;
//  * helpers to compare outputs and to report the first differing line.

import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Paths and environment

public enum Paths {
    /// The package root: this file is Tests/Support/TestSupport.swift.
    public static let packageRoot: String = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent()
        .deletingLastPathComponent()
        .deletingLastPathComponent()
        .path
    public static let fixtureScripts = packageRoot + "/Fixtures"
    /// Per-process work area (fixtures, captured output, converted images).
    public static let work: String = {
        let tmp = ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        return tmp + "/qimg-tests-\(getpid())"
    }()
    public static let capture = work + "/capture"
    public static let scratch = work + "/scratch"

    /// A new, empty directory under `scratch`, named `name-XXXXXXXX`.
    public static func newScratch(_ name: String) throws -> String {
        let dir = scratch + "/\(name)-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }
}

public enum Env {
    public static let isCI = ProcessInfo.processInfo.environment["CI"] == "true"

    /// Set by `make sanitize` (address, thread). AddressSanitizer keeps freed
    /// memory in quarantine and both add shadow memory, so peak-RSS bounds are scaled
    /// (they are checked unscaled by `make test`).
    public static let sanitizer = ProcessInfo.processInfo.environment["QIMG_SANITIZER"]
    public static let memoryBoundScale = sanitizer == "address" || sanitizer == "thread" ? 8 : 1

    public static func which(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        for dir in path.split(separator: ":") where !dir.isEmpty {
            let candidate = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    public static let qemuImg = which("qemu-img")
    public static let qemuIO = which("qemu-io")
    public static let python3 = which("python3")
    public static let qemuAvailable = qemuImg != nil && qemuIO != nil
    public static let qemuStorageDaemon = which("qemu-storage-daemon")
    public static let qemuNBD = which("qemu-nbd")

    public static let missingQEMUMessage =
        "qemu-img/qemu-io not found on PATH (install qemu-utils, e.g. `make deps`)"
}

extension Trait where Self == ConditionTrait {
    /// Skips the test, visibly, when QEMU's tools are missing, unless CI=true:
    /// then the test runs and fails (fixture arguments throw, or
    /// `Fixtures.get()` throws).
    public static var requiresQEMU: Self {
        .enabled(if: Env.qemuAvailable || Env.isCI,
                 "SKIPPED: qemu-img/qemu-io not found on PATH; install qemu-utils (make deps). With CI=true this is a failure.")
    }

    /// Like `.requiresQEMU`, and qemu-storage-daemon too (qemu-system-common).
    public static var requiresStorageDaemon: Self {
        .enabled(if: (Env.qemuAvailable && Env.qemuStorageDaemon != nil) || Env.isCI,
                 "SKIPPED: qemu-storage-daemon (qemu-system-common) or qemu-img/qemu-io not found on PATH; install them (make deps). With CI=true this is a failure.")
    }
}

public struct TestFailure: Error, CustomStringConvertible {
    public var description: String
    public init(_ d: String) { description = d }
}

// MARK: - Running processes

public struct RunResult: Sendable {
    /// Exit status, or the signal number when `signaled`.
    public var status: Int32
    public var signaled: Bool
    /// Killed for using more than its CPU-time limit (SIGXCPU or SIGKILL), or for
    /// still running after `Runner.backstopSeconds` of wall-clock time.
    public var timedOut: Bool
    /// Killed by the wall-clock backstop (not by the CPU-time limit).
    public var backstopped = false
    /// The CPU-time limit the child ran under (seconds).
    public var cpuLimit: Int = 0
    public var stdout: Data
    public var stderr: Data
    public var command: String

    public var out: String { String(decoding: stdout, as: UTF8.self) }
    public var err: String { String(decoding: stderr, as: UTF8.self) }
    public var exitedNormally: Bool { !signaled && !timedOut }

    /// stderr split into lines (a final newline does not start a new line).
    public var stderrLines: [String] {
        var lines = err.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        if lines.last == "" { lines.removeLast() }
        return lines
    }

    public var summary: String {
        let how = backstopped ? "timed out: still running after \(Int(Runner.backstopSeconds)) s (killed)"
            : timedOut ? "timed out: killed by signal \(status) past its CPU-time limit of \(cpuLimit) s"
            : signaled ? "killed by signal \(status)" : "exit \(status)"
        return "`\(command)` -> \(how)"
    }
}

public enum Runner {
    public static let environment: [String: String] = {
        var env = ProcessInfo.processInfo.environment
        env["TZ"] = "UTC"
        env["LC_ALL"] = "C"
        return env
    }()

    private static let prepared: Bool = {
        try? FileManager.default.createDirectory(atPath: Paths.capture, withIntermediateDirectories: true)
        try? FileManager.default.createDirectory(atPath: Paths.scratch, withIntermediateDirectories: true)
        WorkArea.registerCleanup()
        return true
    }()

    /// The wall-clock backstop of `run`: only for a child that blocks forever
    /// without using CPU time. Far beyond anything a loaded machine makes of a run.
    public static let backstopSeconds: Double = 30 * 60

    static let prlimit = Env.which("prlimit")

    /// Runs `executable args` in `cwd` (with `environment` plus `extraEnvironment`);
    /// stdout and stderr go to temporary files (no pipe deadlocks).
    ///
    /// `timeout` is a CPU-time limit, not a wall-clock one: the child runs through
    /// `prlimit --cpu=N:N+1 --core=0 -- executable args` (prlimit sets the limit and execs
    /// the command: same pid; the limit is inherited by the command's own children, each
    /// counting its own time). Past N seconds of CPU the kernel sends SIGXCPU (SIGKILL at
    /// N+1) and the result says `timedOut`. A machine busy with other work slows the child
    /// down but does not make it use more CPU time, so a loaded machine cannot trip the
    /// limit; a child stuck in a loop on malformed input still does. A child that blocks
    /// forever without using CPU is killed after `backstopSeconds` of wall-clock time.
    public static func run(_ executable: String, _ args: [String], cwd: String? = nil,
                           extraEnvironment: [String: String] = [:], timeout: Double = 120) throws -> RunResult {
        _ = prepared
        guard let prlimit else { throw TestFailure("prlimit not found on PATH (install util-linux)") }
        let cpuLimit = max(1, Int(timeout.rounded(.up)))
        let fm = FileManager.default
        let id = UUID().uuidString
        let outPath = "\(Paths.capture)/\(id).out"
        let errPath = "\(Paths.capture)/\(id).err"
        guard fm.createFile(atPath: outPath, contents: nil), fm.createFile(atPath: errPath, contents: nil) else {
            throw TestFailure("cannot create capture files in \(Paths.capture)")
        }
        defer {
            try? fm.removeItem(atPath: outPath)
            try? fm.removeItem(atPath: errPath)
        }
        let outHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: outPath))
        let errHandle = try FileHandle(forWritingTo: URL(fileURLWithPath: errPath))

        let p = Process()
        p.executableURL = URL(fileURLWithPath: prlimit)
        p.arguments = ["--cpu=\(cpuLimit):\(cpuLimit + 1)", "--core=0", "--", executable] + args
        if let cwd { p.currentDirectoryURL = URL(fileURLWithPath: cwd) }
        p.environment = environment.merging(extraEnvironment) { $1 }
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = outHandle
        p.standardError = errHandle
        let done = DispatchSemaphore(value: 0)
        p.terminationHandler = { _ in done.signal() }
        let command = ([URL(fileURLWithPath: executable).lastPathComponent] + args)
            .map { $0.contains(" ") ? "'\($0)'" : $0 }.joined(separator: " ")
        do {
            try p.run()
        } catch {
            try? outHandle.close()
            try? errHandle.close()
            throw TestFailure("cannot start \(command): \(error)")
        }
        try? outHandle.close()
        try? errHandle.close()

        var backstopped = false
        if done.wait(timeout: .now() + backstopSeconds) == .timedOut {
            backstopped = true
            kill(p.processIdentifier, SIGKILL)
            done.wait()
        }
        let signaled = p.terminationReason == .uncaughtSignal
        let overCPU = signaled && (p.terminationStatus == SIGXCPU || p.terminationStatus == SIGKILL)
        return RunResult(
            status: p.terminationStatus,
            signaled: signaled,
            timedOut: backstopped || overCPU,
            backstopped: backstopped,
            cpuLimit: cpuLimit,
            stdout: (try? Data(contentsOf: URL(fileURLWithPath: outPath))) ?? Data(),
            stderr: (try? Data(contentsOf: URL(fileURLWithPath: errPath))) ?? Data(),
            command: command)
    }

    /// Runs qemu-img (which must exist).
    public static func qemuImg(_ args: [String], cwd: String? = nil, timeout: Double = 120) throws -> RunResult {
        guard let exe = Env.qemuImg else { throw TestFailure(Env.missingQEMUMessage) }
        return try run(exe, args, cwd: cwd, timeout: timeout)
    }

    /// Runs qemu-io (which must exist).
    public static func qemuIO(_ args: [String], cwd: String? = nil, timeout: Double = 120) throws -> RunResult {
        guard let exe = Env.qemuIO else { throw TestFailure(Env.missingQEMUMessage) }
        return try run(exe, args, cwd: cwd, timeout: timeout)
    }

    /// Runs a qemu-img step that sets up a LUKS key (which must succeed). QEMU's key setup
    /// times itself by the thread's CPU time and fails with "Unable to get accurate CPU
    /// usage" when its first timed round reads as 0 ms: on a kernel with tick-based CPU
    /// accounting (10 ms ticks on some VMs) a fast hash (sha1) does so in most runs —
    /// measured here: 4 failures in 6. A QEMU setup hiccup, retried (each try takes ms).
    @discardableResult
    public static func qemuImgKeySetup(_ args: [String], in dir: String) throws -> RunResult {
        let attempts = 40
        for attempt in 1...attempts {
            let r = try qemuImg(args, cwd: dir)
            if r.status == 0 { return r }
            guard attempt < attempts, r.err.contains("Unable to get accurate CPU usage") else { throw TestFailure("\(r.summary): \(r.err)") }
        }
        throw TestFailure("unreachable")
    }

    /// Runs a setup step, `["qemu-img", ...]` or `["qemu-io", ...]`, in `dir`; throws
    /// unless it exits 0.
    @discardableResult
    public static func qemuStep(_ args: [String], in dir: String) throws -> RunResult {
        let r = args[0] == "qemu-io" ? try qemuIO(Array(args.dropFirst()), cwd: dir)
                                     : try qemuImg(Array(args.dropFirst()), cwd: dir)
        guard r.status == 0 else { throw TestFailure("\(r.summary): \(r.out)\(r.err)") }
        return r
    }
}

/// A child that runs in the background while a test works next to it (a QEMU process
/// holding an image, a qimg writer), with stdin, stdout and stderr on one end of a socket
/// pair (a bidirectional pipe). The test knows the child is ready when it prints a line:
/// `waitForLine` blocks reading until that line comes, however long a loaded machine
/// takes, and end of file means the child died (its output so far is in the error). No
/// deadline: nothing to time out.
///
/// Our end is close-on-exec from its creation (SOCK_CLOEXEC), so children other tests
/// spawn meanwhile do not keep it open (which would hide the end of file, or keep the
/// child's stdin open).
public final class PipedProcess {
    public let process = Process()
    public let command: String
    /// Our end: we write the child's stdin and read its stdout and stderr.
    private let socket: Int32
    private var received = Data()
    private let ended = DispatchSemaphore(value: 0)
    private var stopped = false

    public init(_ executable: String, _ args: [String], cwd: String? = nil) throws {
        command = ([URL(fileURLWithPath: executable).lastPathComponent] + args).joined(separator: " ")
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            throw TestFailure("socketpair: errno \(errno)")
        }
        // The child's end is dup2()ed onto 0, 1 and 2 (which clears close-on-exec there).
        let childEnd = FileHandle(fileDescriptor: pair[1], closeOnDealloc: false)
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = args
        if let cwd { process.currentDirectoryURL = URL(fileURLWithPath: cwd) }
        process.environment = Runner.environment
        process.standardInput = childEnd
        process.standardOutput = childEnd
        process.standardError = childEnd
        process.terminationHandler = { [ended] _ in ended.signal() }
        defer { close(pair[1]) }
        do { try process.run() } catch {
            close(pair[0])
            throw TestFailure("cannot start \(command): \(error)")
        }
        socket = pair[0]
    }

    deinit {
        stop()
        close(socket)
    }

    /// Everything the child has printed that was read so far.
    public var printed: String { String(decoding: received, as: UTF8.self) }

    /// Writes `text` to the child's stdin.
    public func send(_ text: String) throws {
        var bytes = Array(text.utf8)[...]
        while !bytes.isEmpty {
            let n = bytes.withUnsafeBytes { write(socket, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw TestFailure("\(command): cannot write to its stdin: errno \(errno)") }
            bytes = bytes.dropFirst(n)
        }
    }

    /// Blocks until the child prints a line containing `marker` and returns that line;
    /// throws if its output ends first (it exited, or died).
    @discardableResult
    public func waitForLine(containing marker: String) throws -> String {
        var scanned = 0
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let text = received[scanned...]
            if let nl = text.lastIndex(of: UInt8(ascii: "\n")) {
                let lines = String(decoding: received[scanned..<nl], as: UTF8.self).split(separator: "\n")
                if let line = lines.first(where: { $0.contains(marker) }) { return String(line) }
                scanned = nl + 1
            }
            let n = read(socket, &buffer, buffer.count)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                throw TestFailure("\(command) ended before printing \"\(marker)\"; it printed:\n\(printed)")
            }
            received.append(contentsOf: buffer[0..<n])
        }
    }

    /// Ends the child's stdin, kills the child if it is still running (SIGKILL), and waits
    /// for its end. A wall-clock backstop only guards against an end that never comes.
    public func stop() {
        guard !stopped else { return }
        stopped = true
        shutdown(socket, Int32(SHUT_WR))
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        _ = ended.wait(timeout: .now() + Runner.backstopSeconds)
    }
}

/// Whether another process holds a lock (OFD or POSIX, read or write) on `byte` of the
/// file at `path`: asked of the kernel with F_OFD_GETLK on a descriptor of our own, as QEMU
/// does. (Not by reading /proc/locks: under load, with locks coming and going, a read of
/// it in several chunks can skip an entry that was there all along.)
public func lockHeld(on path: String, byte: Int) -> Bool {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var fl = flock()
    fl.l_type = Int16(F_WRLCK)
    fl.l_whence = Int16(SEEK_SET)
    fl.l_start = off_t(byte)
    fl.l_len = 1
    fl.l_pid = 0  // required by OFD commands
    let getOFDLock: Int32 = 36  // F_OFD_GETLK (<fcntl.h> has it only under _GNU_SOURCE)
    var rc: Int32
    repeat { rc = fcntl(fd, getOFDLock, &fl) } while rc < 0 && errno == EINTR
    return rc == 0 && Int32(fl.l_type) != F_UNLCK
}

/// Removes this process's work area at exit, and work areas left behind by
/// test processes that no longer exist. QIMG_KEEP_FIXTURES=1 keeps them.
enum WorkArea {
    static func registerCleanup() {
        removeStale()
        if ProcessInfo.processInfo.environment["QIMG_KEEP_FIXTURES"] == "1" { return }
        atexit {
            let tmp = ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
            try? FileManager.default.removeItem(atPath: tmp + "/qimg-tests-\(getpid())")
        }
    }

    private static func removeStale() {
        let parent = (Paths.work as NSString).deletingLastPathComponent
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: parent) else { return }
        for name in names where name.hasPrefix("qimg-tests-") {
            guard let pid = Int32(name.dropFirst("qimg-tests-".count)), pid != getpid() else { continue }
            if kill(pid, 0) != 0 && errno == ESRCH {
                try? FileManager.default.removeItem(atPath: parent + "/" + name)
            }
        }
    }
}

// MARK: - Fixtures

public struct ManifestEntry: Sendable, Hashable, CustomTestStringConvertible {
    public var name: String
    public var format: String
    public var testDescription: String { "\(name) [\(format)]" }

    public init(name: String, format: String) {
        self.name = name
        self.format = format
    }
}

public struct CorruptEntry: Sendable, Hashable, CustomTestStringConvertible {
    public var name: String
    public var qemuCheckExit: Int32
    public var testDescription: String { name }
}

public struct MalformedEntry: Sendable, Hashable, CustomTestStringConvertible {
    public var name: String
    /// "qcow2" (force the format) or "auto" (probe).
    public var formatOption: String
    /// Exit code of `timeout 5 qemu-img info [-f qcow2] NAME`.
    public var qemuInfoExit: Int32
    public var description: String
    public var testDescription: String { name }

    /// `-f qcow2` when the format is forced.
    public var formatArgs: [String] { formatOption == "qcow2" ? ["-f", "qcow2"] : [] }

    /// The exit code of `qemu-img info --backing-chain` given in the
    /// description ("... info --backing-chain exits N"), if any.
    public var backingChainExit: Int32? {
        guard let r = description.range(of: "--backing-chain exits ") else { return nil }
        return Int32(description[r.upperBound...].prefix(while: { $0.isNumber }))
    }
}

public struct FixtureSet: Sendable {
    public var validDir: String
    public var corruptDir: String
    public var malformedDir: String
    public var manifest: [ManifestEntry]
    public var corrupt: [CorruptEntry]
    public var malformed: [MalformedEntry]
}

public enum Fixtures {
    /// Generated at first use; every later caller (in either test module)
    /// gets the same directories.
    private static let shared: Result<FixtureSet, TestFailure> = generateOncePerProcess()

    /// The fixture set; throws when QEMU is missing or generation failed.
    public static func get() throws -> FixtureSet {
        guard Env.qemuAvailable else {
            throw TestFailure(Env.missingQEMUMessage + (Env.isCI ? " and CI=true: failing" : ""))
        }
        return try shared.get()
    }

    // Argument lists for parameterized tests. Without QEMU and outside CI
    // they are empty (the tests are skipped by `.requiresQEMU`); with CI=true
    // they throw, which fails the test.
    public static func manifestArguments() throws -> [ManifestEntry] {
        guard Env.qemuAvailable || Env.isCI else { return [] }
        return try get().manifest
    }
    public static func qcow2ManifestArguments() throws -> [ManifestEntry] {
        try manifestArguments().filter { $0.format == "qcow2" }
    }
    public static func corruptArguments() throws -> [CorruptEntry] {
        guard Env.qemuAvailable || Env.isCI else { return [] }
        return try get().corrupt
    }
    public static func malformedArguments() throws -> [MalformedEntry] {
        guard Env.qemuAvailable || Env.isCI else { return [] }
        return try get().malformed
    }

    /// Both test modules run in one process and share this code (the TestSupport
    /// target); a lock file in the per-process work area still makes any second
    /// generator wait for, and then reuse, what the first generated.
    private static func generateOncePerProcess() -> Result<FixtureSet, TestFailure> {
        let root = Paths.work + "/fixtures"
        do {
            try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        } catch {
            return .failure(TestFailure("cannot create \(root): \(error)"))
        }
        let lock = open(root + "/.lock", O_CREAT | O_RDWR | O_CLOEXEC, 0o644)
        guard lock >= 0 else { return .failure(TestFailure("cannot open \(root)/.lock")) }
        defer { close(lock) }
        while flock(lock, LOCK_EX) != 0 && errno == EINTR {}
        defer { flock(lock, LOCK_UN) }

        let set = FixtureSet(validDir: root + "/valid", corruptDir: root + "/corrupt",
                             malformedDir: root + "/malformed", manifest: [], corrupt: [], malformed: [])
        let doneMarker = root + "/.complete"
        let failedMarker = root + "/.failed"
        if let msg = try? String(contentsOfFile: failedMarker, encoding: .utf8) {
            return .failure(TestFailure(msg))
        }
        if !FileManager.default.fileExists(atPath: doneMarker) {
            if let error = runGenerators(set) {
                try? error.description.write(toFile: failedMarker, atomically: true, encoding: .utf8)
                return .failure(error)
            }
            _ = FileManager.default.createFile(atPath: doneMarker, contents: nil)
        }
        return Result { try load(set) }.mapError { $0 as? TestFailure ?? TestFailure("\($0)") }
    }

    private static func runGenerators(_ set: FixtureSet) -> TestFailure? {
        guard let python3 = Env.python3 else { return TestFailure("python3 not found on PATH (needed by Fixtures/*.py)") }
        let jobs: [(String, [String])] = [
            ("/bin/bash", [Paths.fixtureScripts + "/generate.sh", set.validDir]),
            (python3, [Paths.fixtureScripts + "/corrupt.py", set.corruptDir]),
            (python3, [Paths.fixtureScripts + "/malformed.py", set.malformedDir]),
        ]
        for (exe, args) in jobs {
            do {
                let r = try Runner.run(exe, args, cwd: Paths.packageRoot, timeout: 300)
                guard r.exitedNormally, r.status == 0 else {
                    let tail = r.stderrLines.suffix(5).joined(separator: "\n    ")
                    return TestFailure("fixture generation failed: \(r.summary)\n    \(tail)")
                }
            } catch {
                return TestFailure("fixture generation failed: \(error)")
            }
        }
        return nil
    }

    private static func readTSV(_ path: String, columns: Int) throws -> [[String]] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw TestFailure("cannot read \(path)")
        }
        return try text.split(separator: "\n").map { line in
            let cols = line.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
            guard cols.count >= columns else { throw TestFailure("\(path): bad line '\(line)'") }
            return cols
        }
    }

    private static func load(_ base: FixtureSet) throws -> FixtureSet {
        var set = base
        set.manifest = try readTSV(set.validDir + "/manifest.tsv", columns: 2).map {
            ManifestEntry(name: $0[0], format: $0[1])
        }
        set.corrupt = try readTSV(set.corruptDir + "/corrupt.tsv", columns: 2).map {
            guard let code = Int32($0[1]) else { throw TestFailure("corrupt.tsv: bad exit code in \($0)") }
            return CorruptEntry(name: $0[0], qemuCheckExit: code)
        }
        set.malformed = try readTSV(set.malformedDir + "/malformed.tsv", columns: 4).map {
            guard let code = Int32($0[2]) else { throw TestFailure("malformed.tsv: bad exit code in \($0)") }
            return MalformedEntry(name: $0[0], formatOption: $0[1], qemuInfoExit: code,
                                  description: $0[3...].joined(separator: "\t"))
        }
        return set
    }
}

// MARK: - Comparing outputs

public enum Diff {
    /// nil when equal, else where the texts first differ (1-based line, both lines).
    public static func firstDifference(_ expected: String, _ actual: String) -> String? {
        if expected == actual { return nil }
        let e = expected.split(separator: "\n", omittingEmptySubsequences: false)
        let a = actual.split(separator: "\n", omittingEmptySubsequences: false)
        for i in 0..<max(e.count, a.count) {
            let el = i < e.count ? String(e[i]) : "<end of output>"
            let al = i < a.count ? String(a[i]) : "<end of output>"
            if el != al {
                return "line \(i + 1):\n    qemu-img: \(clip(el))\n    qimg:     \(clip(al))"
            }
        }
        return "outputs differ only in line endings"
    }

    private static func clip(_ s: String) -> String {
        s.count > 300 ? String(s.prefix(300)) + "…" : s
    }
}

/// Records an issue unless the two stdouts are equal, naming the first differing line.
public func expectSameStdout(_ label: String, qemu: RunResult, qimg: RunResult,
                      sourceLocation: SourceLocation = #_sourceLocation) {
    if let d = Diff.firstDifference(qemu.out, qimg.out) {
        Issue.record("\(label): stdout differs at \(d)", sourceLocation: sourceLocation)
    }
}

/// Records an issue unless qimg exited normally with qemu-img's exit code.
public func expectSameExit(_ label: String, qemu: RunResult, qimg: RunResult,
                    sourceLocation: SourceLocation = #_sourceLocation) {
    if !qimg.exitedNormally || qimg.status != qemu.status {
        let stderrLine = qimg.stderrLines.first.map { " (stderr: \($0))" } ?? ""
        Issue.record("\(label): \(qimg.summary), qemu-img exit \(qemu.status)\(stderrLine)",
                     sourceLocation: sourceLocation)
    }
}

/// Records an issue unless `r` failed with exit 1...127 and exactly one
/// stderr line starting with "qimg: ".
public func expectCleanFailure(_ label: String, _ r: RunResult, exitCode: Int32? = nil,
                        sourceLocation: SourceLocation = #_sourceLocation) {
    guard r.exitedNormally else {
        Issue.record("\(label): \(r.summary)", sourceLocation: sourceLocation)
        return
    }
    if let exitCode, r.status != exitCode {
        Issue.record("\(label): \(r.summary), expected exit \(exitCode)", sourceLocation: sourceLocation)
    } else if !(1...127).contains(r.status) {
        Issue.record("\(label): \(r.summary), expected exit 1...127", sourceLocation: sourceLocation)
    }
    expectOneErrorLine(label, r, sourceLocation: sourceLocation)
}

/// Records an issue unless stderr is exactly one line starting with "qimg: ".
public func expectOneErrorLine(_ label: String, _ r: RunResult,
                        sourceLocation: SourceLocation = #_sourceLocation) {
    let lines = r.stderrLines
    if lines.count != 1 || !lines[0].hasPrefix("qimg: ") {
        let shown = lines.prefix(3).map { "    \($0)" }.joined(separator: "\n")
        Issue.record("\(label): expected exactly one stderr line starting with 'qimg: ', got \(lines.count):\n\(shown)",
                     sourceLocation: sourceLocation)
    }
}
