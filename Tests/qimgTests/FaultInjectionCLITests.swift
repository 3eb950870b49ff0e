import Foundation
import Testing
import TestSupport

/// Fault injection into the qimg binary (QIMG_FAULTS, a testing aid; see
/// Sources/QCow2/IO/FaultInjection.swift): a command whose write or sync fails exits 1
/// with one line `qimg: FILE: ... failed: <errno text>` and leaves images qemu-img check
/// finds no corruption in. The library-level guarantees are tested in depth by
/// Tests/QCow2Tests/FaultInjectionTests.swift; this checks the command-line surface.
@Suite(.requiresQEMU) struct FaultInjectionCLITests {
    struct Case: Sendable, CustomTestStringConvertible {
        var name: String
        var setup: [[String]]
        var command: [String]
        /// The sync faults: a later sync where the command has one, else the first twice.
        var syncFaults = ["sync:1:EIO", "sync:3:ENOSPC:sticky"]
        var testDescription: String { name }
    }

    /// A copy's target has one sync, its final fsync (its creation has no barriers of its
    /// own); a backup's later syncs update the source's bitmap once the target is complete.
    static let copySyncFaults = ["sync:1:EIO", "sync:1:ENOSPC:sticky"]

    static let cases: [Case] = [
        Case(name: "io write", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "img.qcow2", "8M"],
            ["qemu-img", "bitmap", "--add", "img.qcow2", "b0"],
        ], command: ["io", "-c", "write -P 0x11 0 12k", "-c", "write -P 0x12 2M 8k", "-c", "write -z 4k 4k", "img.qcow2"]),
        Case(name: "bitmap add", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "8M"],
        ], command: ["bitmap", "--add", "img.qcow2", "b0"]),
        Case(name: "backup", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "8M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x21 0 256k", "img.qcow2"],
        ], command: ["backup", "--sync=full", "--bitmap=b", "img.qcow2", "full.qcow2"], syncFaults: copySyncFaults),
        Case(name: "convert", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "8M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 256k", "img.qcow2"],
        ], command: ["convert", "-O", "qcow2", "img.qcow2", "out.qcow2"], syncFaults: copySyncFaults),
        Case(name: "commit", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "8M"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 64k 128k", "img.qcow2"],
        ], command: ["commit", "img.qcow2"]),
        Case(name: "resize", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "img.qcow2", "8M"],
        ], command: ["resize", "img.qcow2", "64M"]),
        Case(name: "create", setup: [], command: ["create", "-q", "-f", "qcow2", "img.qcow2", "8M"]),
    ]

    @Test(arguments: cases)
    func failingCallsGiveOneClearLine(_ c: Case) throws {
        let root = Paths.scratch + "/faults-cli-\(UUID().uuidString.prefix(8))"
        defer { try? FileManager.default.removeItem(atPath: root) }
        for spec in ["write:1:ENOSPC:sticky", "write:3:EIO"] + c.syncFaults {
            let dir = root + "/" + spec.replacingOccurrences(of: ":", with: "-")
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            for s in c.setup {
                let r = s[0] == "qemu-io" ? try Runner.qemuIO(Array(s.dropFirst()), cwd: dir) : try Runner.qemuImg(Array(s.dropFirst()), cwd: dir)
                try #require(r.exitedNormally && r.status == 0, "setup: \(r.summary): \(r.err)")
            }
            guard FileManager.default.isExecutableFile(atPath: Qimg.path) else {
                throw TestFailure("qimg binary not found at \(Qimg.path): run `swift build` first")
            }
            let r = try Runner.run("/usr/bin/env", ["QIMG_FAULTS=\(spec)", Qimg.path] + c.command, cwd: dir)
            let label = "\(c.name) with QIMG_FAULTS=\(spec)"
            if r.exitedNormally && r.status == 0 {
                Issue.record("\(label): succeeded; the fault was not reached or was swallowed")
            } else {
                expectCleanFailure(label, r, exitCode: 1)
                let errnoText = spec.contains("ENOSPC") ? "No space left on device" : "Input/output error"
                let line = r.stderrLines.first ?? ""
                #expect(line.hasPrefix("qimg: ") && line.contains(".qcow2"), "\(label): the error does not name the file: \(line)")
                #expect(line.contains("failed: \(errnoText)"), "\(label): the error does not name the call and errno: \(line)")
            }
            for name in try FileManager.default.contentsOfDirectory(atPath: dir) where name.hasSuffix(".qcow2") {
                try expectCheckClean(name, dir, label, leaksAllowed: true)
            }
            #expect(!FileManager.default.fileExists(atPath: dir + "/full.qcow2"), "\(label): a backup target exists after a failure")
        }
    }
}
