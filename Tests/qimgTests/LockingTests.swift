import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// qimg against QEMU processes through QEMU's image locks, both ways:
/// a qemu-storage-daemon holding an image read-write stops qimg's writers and
/// locking readers (not `-U`), and a running `qimg io` writer stops qemu-img.

extension Env {
    static let qemuStorageDaemon = which("qemu-storage-daemon")
}

extension Trait where Self == ConditionTrait {
    /// Like `.requiresQEMU`, and qemu-storage-daemon too (qemu-system-common).
    static var requiresStorageDaemon: Self {
        .enabled(if: (Env.qemuAvailable && Env.qemuStorageDaemon != nil) || Env.isCI,
                 "SKIPPED: qemu-storage-daemon (qemu-system-common) or qemu-img/qemu-io not found on PATH; install them (make deps). With CI=true this is a failure.")
    }
}

/// Waits (up to `timeout` seconds) until /proc/locks shows a lock covering `byte`
/// of the file at `path` (matched by inode); `alive` is polled to stop early.
func waitForLock(on path: String, byte: Int, timeout: Double = 10,
                 alive: () -> Bool = { true }) throws {
    var st = stat()
    guard stat(path, &st) == 0 else { throw TestFailure("stat \(path): errno \(errno)") }
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if lockHeld(inode: UInt64(st.st_ino), byte: byte) { return }
        guard alive() else { throw TestFailure("the lock holder ended before locking byte \(byte) of \(path)") }
        usleep(1_000)
    }
    throw TestFailure("no lock on byte \(byte) of \(path) after \(timeout) s")
}

func lockHeld(inode: UInt64, byte: Int) -> Bool {
    let text = (try? String(contentsOfFile: "/proc/locks", encoding: .utf8)) ?? ""
    for line in text.split(separator: "\n") {
        // "1: OFDLCK ADVISORY  READ -1 fe:00:16220299 100 101" (adjacent bytes are merged)
        let f = line.split(separator: " ", omittingEmptySubsequences: true)
        guard f.count >= 8, f[5].hasSuffix(":\(inode)"), let lo = Int(f[6]) else { continue }
        let hi = f[7] == "EOF" ? Int.max : Int(f[7]) ?? -1
        if (lo...max(lo, hi)).contains(byte) { return true }
    }
    return false
}

@Suite(.timeLimit(.minutes(2))) struct LockingTests {
    static func makeDir(_ name: String) throws -> String {
        let dir = try Paths.newScratch("\(name)")
        return dir
    }

    static func ok(_ r: RunResult) throws {
        guard r.exitedNormally, r.status == 0 else { throw TestFailure("\(r.summary): \(r.err)") }
    }

    /// Expects exit 1 and one stderr line `qimg: ...` containing "in use".
    static func expectInUse(_ label: String, _ r: RunResult, sourceLocation: SourceLocation = #_sourceLocation) {
        expectCleanFailure(label, r, exitCode: 1, sourceLocation: sourceLocation)
        #expect(r.err.contains("in use"), "\(label): \(r.err)", sourceLocation: sourceLocation)
    }

    @Test(.requiresStorageDaemon)
    func storageDaemonWriterStopsQimg() throws {
        guard let qsd = Env.qemuStorageDaemon, Env.qemuAvailable else {
            throw TestFailure("qemu-storage-daemon/qemu-img/qemu-io not found on PATH and CI=true: failing")
        }
        let dir = try Self.makeDir("lock-qsd")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let img = dir + "/img.qcow2"
        try Self.ok(try Runner.qemuImg(["create", "-q", "-f", "qcow2", img, "4M"]))
        try Self.ok(try Runner.qemuIO(["-f", "qcow2", "-c", "write -P 0x5a 0 64k", img]))

        // In the foreground, as our child: with --daemonize the daemon would inherit the
        // descriptor Foundation uses to see its parent exit, and Process would never
        // report that exit while the daemon lives.
        let daemon = Process()
        daemon.executableURL = URL(fileURLWithPath: qsd)
        daemon.arguments = ["--blockdev", "driver=file,node-name=f,filename=\(img)",
                            "--blockdev", "driver=qcow2,node-name=q,file=f"]
        daemon.environment = Runner.environment
        daemon.standardInput = FileHandle.nullDevice
        daemon.standardOutput = FileHandle.nullDevice
        daemon.standardError = FileHandle.nullDevice
        let ended = DispatchSemaphore(value: 0)
        daemon.terminationHandler = { _ in ended.signal() }
        try daemon.run()
        defer {
            kill(daemon.processIdentifier, SIGKILL)
            _ = ended.wait(timeout: .now() + 10)
        }
        try waitForLock(on: img, byte: 101, alive: { daemon.isRunning })

        let before = try Data(contentsOf: URL(fileURLWithPath: img))
        Self.expectInUse("qimg io write", try Qimg.run(["io", "-c", "write 0 4k", "img.qcow2"], cwd: dir))
        Self.expectInUse("qimg resize", try Qimg.run(["resize", "img.qcow2", "+1M"], cwd: dir))
        Self.expectInUse("qimg info (locking reader)", try Qimg.run(["info", "img.qcow2"], cwd: dir))
        let info = try Qimg.run(["info", "-U", "img.qcow2"], cwd: dir)
        #expect(info.exitedNormally && info.status == 0, "qimg info -U: \(info.summary): \(info.err)")
        #expect(info.out.contains("file format: qcow2"), "qimg info -U: \(info.out)")
        let map = try Qimg.run(["map", "-U", "img.qcow2"], cwd: dir)
        #expect(map.exitedNormally && map.status == 0, "qimg map -U: \(map.summary): \(map.err)")
        let after = try Data(contentsOf: URL(fileURLWithPath: img))
        #expect(after == before, "the image changed while qemu-storage-daemon held it")
        #expect(daemon.isRunning, "qemu-storage-daemon ended during the test")
    }

    @Test(.requiresQEMU)
    func runningQimgWriterStopsQemuImg() throws {
        let dir = try Self.makeDir("lock-qimg-writer")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let img = dir + "/img.qcow2"
        try Self.ok(try Runner.qemuImg(["create", "-q", "-f", "qcow2", img, "64M"]))
        guard FileManager.default.isExecutableFile(atPath: Qimg.path) else {
            throw TestFailure("qimg binary not found at \(Qimg.path): run `swift build` first")
        }

        // A writer with a long list of large writes; once its write lock shows, it is
        // stopped (SIGSTOP keeps its locks) so the checks below run while it holds the image.
        var args = ["io"]
        for i in 0..<400 { args += ["-c", "write -P \(i % 255 + 1) \((i % 16) * 4)M 4M"] }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Qimg.path)
        p.arguments = args + ["img.qcow2"]
        p.currentDirectoryURL = URL(fileURLWithPath: dir)
        p.environment = Runner.environment
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        defer {
            kill(p.processIdentifier, SIGKILL)
            kill(p.processIdentifier, SIGCONT)
            p.waitUntilExit()
        }
        try waitForLock(on: img, byte: 101, alive: { p.isRunning })
        kill(p.processIdentifier, SIGSTOP)
        #expect(p.isRunning, "the qimg writer ended before the checks")

        let locked = try Runner.qemuImg(["info", "img.qcow2"], cwd: dir)
        #expect(locked.exitedNormally && locked.status != 0, "qemu-img info while qimg writes: \(locked.summary)")
        #expect(locked.err.contains("lock"), "qemu-img info: \(locked.err)")
        let shared = try Runner.qemuImg(["info", "-U", "img.qcow2"], cwd: dir)
        #expect(shared.exitedNormally && shared.status == 0, "qemu-img info -U: \(shared.summary): \(shared.err)")
        // A second qimg writer is refused too.
        Self.expectInUse("second qimg writer", try Qimg.run(["io", "-c", "write 0 4k", "img.qcow2"], cwd: dir))
        #expect(lockHeld(inode: Self.inode(img), byte: 101), "the qimg writer no longer holds its lock")
    }

    static func inode(_ path: String) -> UInt64 {
        var st = stat()
        return stat(path, &st) == 0 ? UInt64(st.st_ino) : 0
    }
}
