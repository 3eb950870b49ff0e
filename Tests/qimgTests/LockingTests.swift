import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// qimg against QEMU processes through QEMU's image locks, both ways:
/// a qemu-storage-daemon holding an image read-write stops qimg's writers and
/// locking readers (not `-U`), and a running `qimg io` writer stops qemu-img.

@Suite struct LockingTests {
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

        // In the foreground, as our child, with its QMP monitor on stdio: the greeting it
        // prints there comes after the --blockdev options have opened (and locked) the image.
        let daemon = try PipedProcess(qsd, ["--blockdev", "driver=file,node-name=f,filename=\(img)",
                                            "--blockdev", "driver=qcow2,node-name=q,file=f",
                                            "--chardev", "stdio,id=m0", "--monitor", "chardev=m0"])
        defer { daemon.stop() }
        try daemon.waitForLine(containing: "\"QMP\"")
        try #require(lockHeld(on: img, byte: 101), "qemu-storage-daemon holds no write lock on \(img)")

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
        #expect(daemon.process.isRunning, "qemu-storage-daemon ended during the test")
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

        // A writer with a long list of large writes; once it has printed its first line (it
        // has opened and locked the image, and written), it is stopped (SIGSTOP keeps its
        // locks) so the checks below run while it holds the image.
        var args = ["io"]
        for i in 0..<400 { args += ["-c", "write -P \(i % 255 + 1) \((i % 16) * 4)M 4M"] }
        let p = try PipedProcess(Qimg.path, args + ["img.qcow2"], cwd: dir)
        defer {
            kill(p.process.processIdentifier, SIGKILL)
            kill(p.process.processIdentifier, SIGCONT)
            p.stop()
        }
        try p.waitForLine(containing: "wrote 4194304/4194304 bytes at offset 0")
        kill(p.process.processIdentifier, SIGSTOP)
        #expect(p.process.isRunning, "the qimg writer ended before the checks")

        let locked = try Runner.qemuImg(["info", "img.qcow2"], cwd: dir)
        #expect(locked.exitedNormally && locked.status != 0, "qemu-img info while qimg writes: \(locked.summary)")
        #expect(locked.err.contains("lock"), "qemu-img info: \(locked.err)")
        let shared = try Runner.qemuImg(["info", "-U", "img.qcow2"], cwd: dir)
        #expect(shared.exitedNormally && shared.status == 0, "qemu-img info -U: \(shared.summary): \(shared.err)")
        // A second qimg writer is refused too.
        Self.expectInUse("second qimg writer", try Qimg.run(["io", "-c", "write 0 4k", "img.qcow2"], cwd: dir))
        #expect(lockHeld(on: img, byte: 101), "the qimg writer no longer holds its lock")
    }
}
