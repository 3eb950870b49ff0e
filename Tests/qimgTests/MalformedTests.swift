import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Every file of malformed.tsv through five qimg commands. Each must end on
/// its own (no signal) within 5 s and leave the file's bytes and mtime
/// alone. Where qemu-img rejects the file (QEMU_INFO_EXIT != 0), and for the
/// backing loop/self/missing cases with --backing-chain or map, qimg must
/// fail with exit 1...127 and exactly one stderr line `qimg: ...`. Elsewhere
/// qimg may accept or reject, but a failure must still be that one line.

enum MalformedCommand: String, CaseIterable, Sendable {
    case info, infoBackingChain, mapJSON, check, ioRead

    func args(_ e: MalformedEntry) -> [String] {
        switch self {
        case .info: return ["info"] + e.formatArgs + [e.name]
        case .infoBackingChain: return ["info"] + e.formatArgs + ["--backing-chain", e.name]
        case .mapJSON: return ["map"] + e.formatArgs + ["--output=json", e.name]
        case .check: return ["check"] + e.formatArgs + [e.name]
        case .ioRead: return ["io"] + e.formatArgs + ["-c", "read 0 512", e.name]
        }
    }

    /// Commands that open the backing chain.
    var opensBackingChain: Bool { self == .infoBackingChain || self == .mapJSON }
}

/// The bytes and modification time of a file.
struct FileState: Equatable {
    var bytes: Data
    var mtimeSec: Int
    var mtimeNsec: Int

    init(_ path: String) throws {
        bytes = try Data(contentsOf: URL(fileURLWithPath: path))
        var st = stat()
        guard stat(path, &st) == 0 else { throw TestFailure("stat \(path) failed: errno \(errno)") }
        mtimeSec = Int(st.st_mtim.tv_sec)
        mtimeNsec = Int(st.st_mtim.tv_nsec)
    }
}

@Suite struct MalformedTests {
    @Test(.requiresQEMU) func enoughMalformedCases() throws {
        let f = try Fixtures.get()
        #expect(f.malformed.count >= 20, "only \(f.malformed.count) malformed cases")
    }

    @Test(.requiresQEMU, arguments: try Fixtures.malformedArguments())
    func malformedFileFailsCleanly(_ entry: MalformedEntry) throws {
        let f = try Fixtures.get()
        let path = f.malformedDir + "/" + entry.name
        let before = try FileState(path)
        let rejectedByQEMU = entry.qemuInfoExit != 0
        let backingFails = (entry.backingChainExit ?? 0) != 0

        for cmd in MalformedCommand.allCases {
            let r = try Qimg.run(cmd.args(entry), cwd: f.malformedDir, timeout: 5)
            let label = "\(entry.name) (\(entry.description)): \(r.command)"
            if r.timedOut {
                Issue.record("\(label): \(r.summary)")
                continue
            }
            if r.signaled {
                Issue.record("\(label): killed by signal \(r.status)")
                continue
            }
            let mustFail = rejectedByQEMU || (backingFails && cmd.opensBackingChain)
            // check reports what it finds (exit 2 corruptions, 3 leaks) where the other
            // commands refuse to open: e.g. a broken bitmaps extension, which check -r all repairs.
            if cmd == .check && (r.status == 2 || r.status == 3) {
                #expect(r.stderrLines.allSatisfy { $0.hasPrefix("ERROR") || $0.hasPrefix("Leaked") }, "\(label): \(r.err)")
                continue
            }
            if mustFail {
                expectCleanFailure(label, r)
            } else if r.status != 0 {
                expectCleanFailure(label, r)
            }
        }
        let after = try FileState(path)
        #expect(after.bytes == before.bytes, "\(entry.name): file contents changed")
        #expect(after.mtimeSec == before.mtimeSec && after.mtimeNsec == before.mtimeNsec,
                "\(entry.name): mtime changed")
    }

    /// Unknown incompatible features are refused by name when the feature name table names them.
    @Test(.requiresQEMU) func unknownFeatureIsNamed() throws {
        let f = try Fixtures.get()
        let r = try Qimg.run(["info", "incompat-bit5-named.qcow2"], cwd: f.malformedDir, timeout: 5)
        #expect(r.status == 1)
        #expect(r.err == "qimg: incompat-bit5-named.qcow2: unsupported qcow2 feature(s): frobnicated clusters (bit 5)\n")
        let q = try Qimg.run(["info", "incompat-bit5.qcow2"], cwd: f.malformedDir, timeout: 5)
        #expect(q.err == "qimg: incompat-bit5.qcow2: unsupported qcow2 feature(s): unknown incompatible feature bit 5\n")
    }

    /// A backing chain that comes back to a file already in it is an error, not a recursion.
    @Test(.requiresQEMU, arguments: ["loop-a.qcow2", "self.qcow2", "self2.qcow2"])
    func backingLoopIsReported(_ name: String) throws {
        let f = try Fixtures.get()
        let r = try Qimg.run(["map", "--output=json", name], cwd: f.malformedDir, timeout: 5)
        #expect(r.status == 1)
        #expect(r.stderrLines.count == 1 && r.err.contains("backing chain loop"), "\(r.err)")
    }
}

