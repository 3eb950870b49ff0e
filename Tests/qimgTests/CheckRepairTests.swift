import Foundation
import Testing
import TestSupport

/// `qimg check -r all` against `qemu-img check -r all` on the same damaged image: the
/// same report lines (stderr), the same summary (stdout, human and JSON), the same exit
/// code, and afterwards an image qemu-img finds clean with the same guest data as
/// qemu-img's repair leaves. The damages are those of QEMU's iotest 060 and the other
/// cases qemu-img repairs (layout of a fresh 64 MiB compat=1.1 image: refcount table
/// at 0x10000, its one block at 0x20000, L1 at 0x30000, first L2 at 0x40000).
enum RepairCase: String, CaseIterable, Sendable, CustomTestStringConvertible {
    /// iotest 060: a data cluster at the refcount block (the block then has refcount 2).
    case refblockSharedWithData
    /// The refcount table names a second block past the end of the file.
    case refblockPastEnd
    /// The refcount table names a block past the largest file offset (the file cannot grow
    /// to hold it: "Invalid argument").
    case refblockFarPastEnd
    /// The refcount table names an unaligned block (inside the header cluster).
    case refblockUnaligned
    /// The refcount table is empty: every used cluster has refcount 0.
    case emptyRefcountTable
    /// One data cluster with refcount 0.
    case usedClusterRefcountZero
    /// COPIED cleared in the L1 entry and in the L2 entry.
    case copiedFlagsWrong
    /// A 64 GiB image with 128 L2 tables, COPIED cleared in every L1 entry and in the
    /// first entry of 8 tables (as on the fuzzed input where `check -r all` wrote and
    /// synced each of 135,000 L1 entries on its own, copying the whole L1 table each time).
    case copiedFlagsWrongInManyTables
    /// A data cluster with refcount 513.
    case refcountTooHigh
    /// A cluster nothing references with refcount 1.
    case leakedCluster
    /// The L1 entry points at the refcount table (an L2 table overlapping it).
    case l2OverlapsRefcountTable
    /// iotest 060: a data cluster of the active table at a snapshot's L2 table.
    case dataAtSnapshotL2Table
    /// 512-byte clusters, 12 MiB written (a refcount table of several clusters, a few
    /// hundred blocks), the table's first entry emptied: QEMU's block placement in full.
    case manyBlocksFirstEntryEmptied

    var testDescription: String { rawValue }

    static let rt: UInt64 = 0x10000, rb: UInt64 = 0x20000, l1: UInt64 = 0x30000, l2: UInt64 = 0x40000

    /// Creates the damaged image `name` in `dir` with QEMU's tools.
    func make(_ name: String, in dir: String) throws {
        let clusterSize = self == .manyBlocksFirstEntryEmptied ? "512" : "65536"
        let size = self == .copiedFlagsWrongInManyTables ? "64G" : "64M"
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=\(clusterSize)", name, size], in: dir)
        let path = dir + "/" + name
        func poke(_ at: UInt64, _ bytes: [UInt8]) throws { try CheckRepairTests.poke(path, at, bytes) }
        let be64 = { (v: UInt64) in (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * UInt64($0))) } }
        if self == .refblockSharedWithData {
            try CheckRepairTests.resize(path, to: Self.l2 + 0x10000)
            try poke(Self.l1, be64(0x8000_0000_0004_0000))
            try poke(Self.rb + 8, [0, 1])
            try poke(Self.l2, be64(0x8000_0000_0002_0000))
            // QEMU's overlap check refuses the write and marks the image corrupt.
            _ = try Runner.qemuIO(["-c", "open -o overlap-check=all \(name)", "-c", "write -P 0x2a 0 512"], cwd: dir)
            return
        }
        if self == .dataAtSnapshotL2Table {
            try Runner.qemuStep(["qemu-io", "-c", "write -P 1 0 512", name], in: dir)
            try Runner.qemuStep(["qemu-img", "snapshot", "-c", "foo", name], in: dir)
            try Runner.qemuStep(["qemu-io", "-c", "write -P 2 0 512", name], in: dir)
            try poke(0x80000, be64(0x8000_0000_0004_0000))  // the active L2 table after the snapshot
            _ = try Runner.qemuIO(["-c", "open -o overlap-check=all \(name)", "-c", "write -P 3 0 512"], cwd: dir)
            return
        }
        if self == .copiedFlagsWrongInManyTables {
            try Runner.qemuStep(["qemu-io"] + (0..<128).flatMap { ["-c", "write -P 7 \($0 * 512)M 64k"] } + [name], in: dir)
            let l1 = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)).dropFirst(Int(Self.l1)).prefix(128 * 8))
            for i in 0..<128 {
                try poke(Self.l1 + 8 * UInt64(i), [0])
                if i < 8 { try poke(l1[8 * i + 1 ..< 8 * i + 8].reduce(0) { $0 << 8 | UInt64($1) }, [0]) }
            }
            return
        }
        try Runner.qemuStep(["qemu-io", "-c", "write -P 7 0 \(self == .manyBlocksFirstEntryEmptied ? "12M" : "64k")", name], in: dir)
        switch self {
        case .refblockSharedWithData, .dataAtSnapshotL2Table, .copiedFlagsWrongInManyTables: break
        case .refblockPastEnd: try poke(Self.rt + 8, be64(0x10_0000))
        case .refblockFarPastEnd: try poke(Self.rt + 8, be64(0x7FFF_FFFF_FFFF_0000))
        case .refblockUnaligned: try poke(Self.rt + 8, be64(0x200))
        case .emptyRefcountTable: try poke(Self.rt, be64(0))
        case .usedClusterRefcountZero: try poke(Self.rb + 10, [0, 0])
        case .copiedFlagsWrong:
            try poke(Self.l1, [0])
            try poke(Self.l2, [0])
        case .refcountTooHigh: try poke(Self.rb + 10, [2, 1])
        case .leakedCluster:
            try CheckRepairTests.resize(path, to: 8 * 0x10000)
            try poke(Self.rb + 12, [0, 1])
        case .l2OverlapsRefcountTable: try poke(Self.l1, be64(0x8000_0000_0001_0000))
        case .manyBlocksFirstEntryEmptied:
            let header = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)).prefix(56))
            try poke(header[48..<56].reduce(0) { $0 << 8 | UInt64($1) }, be64(0))
        }
    }
}

@Suite struct CheckRepairTests {
    static func poke(_ path: String, _ at: UInt64, _ bytes: [UInt8]) throws {
        guard let h = FileHandle(forUpdatingAtPath: path) else { throw TestFailure("cannot open \(path)") }
        defer { try? h.close() }
        try h.seek(toOffset: at)
        try h.write(contentsOf: Data(bytes))
    }

    static func resize(_ path: String, to length: UInt64) throws {
        guard let h = FileHandle(forUpdatingAtPath: path) else { throw TestFailure("cannot open \(path)") }
        defer { try? h.close() }
        try h.truncate(atOffset: length)
    }

    static func scratch(_ name: String) throws -> String { try Paths.newScratch("check-repair-" + name) }

    /// Guest data identical (qemu-img compare, which opens both read-only).
    static func expectSameData(_ a: String, _ b: String, _ dir: String, _ label: String) throws {
        let r = try Runner.qemuImg(["compare", "-f", "qcow2", "-F", "qcow2", a, b], cwd: dir)
        #expect(r.exitedNormally && r.status == 0, "\(label): guest data differs: \(r.out)\(r.err)")
    }

    /// The damage is real: qemu-img check finds it before the repair.
    @Test(.requiresQEMU, arguments: RepairCase.allCases)
    func damageIsSeenByQemuImg(_ c: RepairCase) throws {
        let dir = try Self.scratch("seen-\(c.rawValue)")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try c.make("img.qcow2", in: dir)
        let (qemu, mine) = try runBoth(["check", "img.qcow2"], cwd: dir)
        #expect(qemu.status != 0, "\(c): qemu-img check finds nothing wrong")
        expectSameExit("\(c): check", qemu: qemu, qimg: mine)
        #expect(mine.err == qemu.err, "\(c): check lines differ:\nqemu-img:\n\(qemu.err)\nqimg:\n\(mine.err)")
    }

    /// `check -r all`: same lines, same summary, same exit code; then clean, with the
    /// guest data qemu-img's repair leaves.
    @Test(.requiresQEMU, arguments: RepairCase.allCases, CheckMode.allCases)
    func repairMatchesQemuImg(_ c: RepairCase, _ mode: CheckMode) throws {
        let dir = try Self.scratch("all-\(c.rawValue)-\(mode.rawValue)")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for sub in ["q", "m"] { try FileManager.default.createDirectory(atPath: dir + "/" + sub, withIntermediateDirectories: true) }
        try c.make("img.qcow2", in: dir + "/q")
        try FileManager.default.copyItem(atPath: dir + "/q/img.qcow2", toPath: dir + "/m/img.qcow2")
        let args = ["check", "-r", "all"] + mode.args + ["img.qcow2"]
        let qemu = try Runner.qemuImg(args, cwd: dir + "/q")
        let mine = try Qimg.run(args, cwd: dir + "/m")
        let label = "\(c): \(args.joined(separator: " "))"
        #expect(qemu.exitedNormally && qemu.status == 0, "\(label): qemu-img's repair did not end clean: \(qemu.err)")
        expectSameExit(label, qemu: qemu, qimg: mine)
        expectSameStdout(label, qemu: qemu, qimg: mine)
        #expect(mine.err == qemu.err, "\(label): repair lines differ:\nqemu-img:\n\(qemu.err)\nqimg:\n\(mine.err)")
        try expectCheckClean("m/img.qcow2", dir, label + ", then qemu-img check")
        try Self.expectSameData("q/img.qcow2", "m/img.qcow2", dir, label)
        // The repaired image is in use as QEMU leaves it: a write lands and checks clean.
        try Runner.qemuStep(["qemu-io", "-c", "write -P 0x2a 0 512", "m/img.qcow2"], in: dir)
        try expectCheckClean("m/img.qcow2", dir, label + ", after a write")
    }

    /// `check -r leaks`: the same lines, summary and exit code; where a rebuild is needed
    /// both fail (exit 1), qimg with its one-line error instead of qemu-img's
    /// "Check failed: Input/output error".
    @Test(.requiresQEMU, arguments: RepairCase.allCases)
    func repairLeaksMatchesQemuImg(_ c: RepairCase) throws {
        let dir = try Self.scratch("leaks-\(c.rawValue)")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for sub in ["q", "m"] { try FileManager.default.createDirectory(atPath: dir + "/" + sub, withIntermediateDirectories: true) }
        try c.make("img.qcow2", in: dir + "/q")
        try FileManager.default.copyItem(atPath: dir + "/q/img.qcow2", toPath: dir + "/m/img.qcow2")
        let args = ["check", "-r", "leaks", "img.qcow2"]
        let qemu = try Runner.qemuImg(args, cwd: dir + "/q")
        let mine = try Qimg.run(args, cwd: dir + "/m")
        let label = "\(c): check -r leaks"
        expectSameExit(label, qemu: qemu, qimg: mine)
        expectSameStdout(label, qemu: qemu, qimg: mine)
        let report = { (err: String) in err.split(separator: "\n").filter { !$0.hasPrefix("qemu-img: ") && !$0.hasPrefix("qimg: ") } }
        #expect(report(mine.err) == report(qemu.err), "\(label): lines differ:\nqemu-img:\n\(qemu.err)\nqimg:\n\(mine.err)")
        if qemu.status == 1 {
            let errors = mine.stderrLines.filter { $0.hasPrefix("qimg: ") }
            #expect(errors.count == 1 && mine.stderrLines.last == errors.first, "\(label): \(mine.err)")
        }
        try Self.expectSameData("q/img.qcow2", "m/img.qcow2", dir, label)
    }

    /// A refcount table entry with reserved bits: qemu-img 7.2's own repair fails (its
    /// overlap check refuses to write the new block over the old one, which it does not
    /// count); qimg rebuilds around the old structure and ends clean, data unchanged.
    @Test(.requiresQEMU) func reservedBitsInTheRefcountTableAreRebuilt() throws {
        let dir = try Self.scratch("reserved")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "64M"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 7 0 64k", "img.qcow2"], in: dir)
        try Self.poke(dir + "/img.qcow2", RepairCase.rt + 7, [0x01])
        try FileManager.default.copyItem(atPath: dir + "/img.qcow2", toPath: dir + "/before.qcow2")
        let (qemu, mine) = try runBoth(["check", "img.qcow2"], cwd: dir)
        #expect(qemu.status == 2 && qemu.err.contains("ERROR refcount table entry 0 has reserved bits set"))
        expectSameExit("check", qemu: qemu, qimg: mine)
        #expect(mine.err == qemu.err, "check lines differ:\nqemu-img:\n\(qemu.err)\nqimg:\n\(mine.err)")
        let r = try Qimg.run(["check", "-r", "all", "img.qcow2"], cwd: dir)
        #expect(r.status == 0 && r.err.contains("Rebuilding refcount structure"), "\(r.summary): \(r.err)")
        try expectCheckClean("img.qcow2", dir, "after check -r all")
        try Self.expectSameData("before.qcow2", "img.qcow2", dir, "after check -r all")
    }

    /// A block named too far past the end of the file (more than the file's length again,
    /// or 16 clusters) is not given a cluster: the file does not grow beyond twice its length,
    /// the structure is rebuilt without the block, and the image ends clean with its data.
    /// (qemu-img 7.2 extends the file to the block and leaves it that long; the 32 GiB case
    /// is what scripts/fuzz found: `check -r all` growing a 384 KiB file by gigabytes.)
    @Test(.requiresQEMU, arguments: [UInt64(64) << 20, UInt64(32) << 30, UInt64(1) << 40])
    func blockFarPastTheEndIsRebuiltAround(_ blockOffset: UInt64) throws {
        let dir = try Self.scratch("far-block-\(blockOffset)")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "64M"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 7 0 64k", "img.qcow2"], in: dir)
        try Self.poke(dir + "/img.qcow2", RepairCase.rt + 8, (0..<8).map { UInt8(truncatingIfNeeded: blockOffset >> (56 - 8 * UInt64($0))) })
        try FileManager.default.copyItem(atPath: dir + "/img.qcow2", toPath: dir + "/before.qcow2")
        let sizeBefore = try FileManager.default.attributesOfItem(atPath: dir + "/img.qcow2")[.size] as? Int ?? 0
        let r = try Qimg.run(["check", "-r", "all", "img.qcow2"], cwd: dir)
        #expect(r.status == 0 && r.err.contains("ERROR could not resize image: File too large")
                && r.err.contains("Rebuilding refcount structure"), "\(r.summary): \(r.err)")
        let size = try FileManager.default.attributesOfItem(atPath: dir + "/img.qcow2")[.size] as? Int ?? 0
        #expect(size > 0 && size <= 2 * sizeBefore, "the file grew from \(sizeBefore) to \(size) bytes")
        try expectCheckClean("img.qcow2", dir, "after check -r all")
        try Self.expectSameData("before.qcow2", "img.qcow2", dir, "after check -r all")
    }

    /// Refcount blocks past the end of the file, each within reach of the file as the one
    /// before it left it (block 1 eight clusters past the end, blocks 2-8 each 2^20 - 1
    /// clusters past the one before; 4 KiB clusters): the first gets its cluster as QEMU
    /// gives it, the rest are left out. Found by scripts/fuzz as a `check -r all` hang: each
    /// block grew the file by 4 GiB and the counters held in memory with it (qemu-img 7.2
    /// does the same: 8 such blocks make a 28 KiB image a 32 GiB one).
    @Test(.requiresQEMU) func blocksPastTheEndDoNotAddUp() throws {
        let dir = try Self.scratch("chained-blocks")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "img.qcow2", "4M"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 7 0 8k", "img.qcow2"], in: dir)
        let path = dir + "/img.qcow2"
        let header = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)).prefix(56))
        let table = header[48..<56].reduce(0) { $0 << 8 | UInt64($1) }
        let sizeBefore = try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int ?? 0
        var cluster = UInt64(sizeBefore / 4096) + 8
        for k in UInt64(1)...8 {
            try Self.poke(path, table + 8 * k, (0..<8).map { UInt8(truncatingIfNeeded: (cluster << 12) >> (56 - 8 * UInt64($0))) })
            cluster += (1 << 20) - 1
        }
        try FileManager.default.copyItem(atPath: path, toPath: dir + "/before.qcow2")
        let r = try Qimg.run(["check", "-r", "all", "img.qcow2"], cwd: dir)
        let refused = r.stderrLines.filter { $0 == "ERROR could not resize image: File too large" }
        #expect(r.status == 0 && refused.count == 7 && r.err.contains("Rebuilding refcount structure"), "\(r.summary): \(r.err)")
        let size = try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int ?? 0
        #expect(size > sizeBefore && size <= 2 * sizeBefore + 16 * 4096, "the file grew from \(sizeBefore) to \(size) bytes")
        try expectCheckClean("img.qcow2", dir, "after check -r all")
        try Self.expectSameData("before.qcow2", "img.qcow2", dir, "after check -r all")
    }

    /// COPIED repairs are written one table at a time: all 128 L1 entries with one write and
    /// one sync, each of the 8 L2 tables with one (so a kill at the 32nd sync is never
    /// reached; it was, with a write and a sync per L1 entry).
    @Test(.requiresQEMU) func copiedRepairsSyncOncePerTable() throws {
        let dir = try Self.scratch("copied-syncs")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try RepairCase.copiedFlagsWrongInManyTables.make("img.qcow2", in: dir)
        let spec = "sync:32:kill,prefix:img.qcow2"
        let r = try Runner.run("/usr/bin/env", ["QIMG_FAULTS=\(spec)", Qimg.path, "check", "-r", "all", "img.qcow2"], cwd: dir)
        #expect(r.exitedNormally && r.status == 0, "QIMG_FAULTS=\(spec): \(r.summary): \(r.err)")
        #expect(r.stderrLines.filter { $0.hasPrefix("Repairing OFLAG_COPIED") }.count == 136, "\(r.err)")
        try expectCheckClean("img.qcow2", dir, "after check -r all")
    }

    /// `-r leaks` cannot rebuild: like qemu-img it fails (exit 1), and leaves the file
    /// exactly as it was.
    @Test(.requiresQEMU) func leaksModeRefusesARebuild() throws {
        let dir = try Self.scratch("leaks-mode")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try RepairCase.refblockSharedWithData.make("img.qcow2", in: dir)
        let before = try Data(contentsOf: URL(fileURLWithPath: dir + "/img.qcow2"))
        let m = try Qimg.run(["check", "-r", "leaks", "img.qcow2"], cwd: dir)
        #expect(m.status == 1 && m.err.contains("ERROR need to rebuild refcount structures"), "\(m.summary): \(m.err)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir + "/img.qcow2")) == before, "check -r leaks changed the file")
    }

    /// SIGKILL at every write and every sync of `qimg check -r all` (odd writes torn in
    /// half), on iotest 060's image and the other damages: a second `check -r all` then
    /// ends clean, and the guest data is what qemu-img's repair leaves. (Not the 12 MiB
    /// case: hundreds of kills, each checked, for nothing the small ones do not cover.)
    @Test(.requiresQEMU, arguments: RepairCase.allCases.filter { $0 != .manyBlocksFirstEntryEmptied })
    func killDuringTheRepairLeavesARepairableImage(_ c: RepairCase) throws {
        let dir = try Self.scratch("kill-\(c.rawValue)")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try c.make("template.qcow2", in: dir)
        try FileManager.default.copyItem(atPath: dir + "/template.qcow2", toPath: dir + "/reference.qcow2")
        _ = try Runner.qemuImg(["check", "-r", "all", "reference.qcow2"], cwd: dir)
        try expectCheckClean("reference.qcow2", dir, "qemu-img's repair")
        var kills = 0
        for kind in ["write", "sync"] {
            var n = 1
            while n < 100 {
                unlink(dir + "/img.qcow2")
                try FileManager.default.copyItem(atPath: dir + "/template.qcow2", toPath: dir + "/img.qcow2")
                let spec = "\(kind):\(n):kill\(kind == "write" && n % 2 == 1 ? ":partial" : ""),prefix:img.qcow2"
                let label = "\(c): QIMG_FAULTS=\(spec)"
                let r = try Runner.run("/usr/bin/env", ["QIMG_FAULTS=\(spec)", Qimg.path, "check", "-r", "all", "img.qcow2"], cwd: dir)
                if r.exitedNormally {  // past the last call: nothing left to kill
                    #expect(r.status == 0, "\(label): \(r.summary): \(r.err)")
                    break
                }
                #expect(r.signaled && r.status == SIGKILL, "\(label): \(r.summary): \(r.err)")
                kills += 1
                let again = try Qimg.run(["check", "-r", "all", "img.qcow2"], cwd: dir)
                #expect(again.exitedNormally && again.status == 0, "\(label), second check -r all: \(again.summary): \(again.err)")
                try expectCheckClean("img.qcow2", dir, label)
                try Self.expectSameData("reference.qcow2", "img.qcow2", dir, label)
                n += 1
            }
            #expect(n > 1, "\(kind): no \(kind) was reached (the campaign kills nothing)")
        }
        // iotest 060's rebuild: blocks, table, barrier, header, the leak fixes and their barriers.
        #expect(c != .refblockSharedWithData || kills >= 8, "only \(kills) kills")
    }

    /// The library's check and repair report names no CLI command or flag (the CLI adds
    /// its own advice).
    @Test func checkReportNamesNoCLIFlag() throws {
        let dir = Paths.packageRoot + "/Sources/QCow2"
        let files = try FileManager.default.subpathsOfDirectory(atPath: dir).filter {
            $0.hasSuffix(".swift") && ($0.contains("Check") || $0.contains("Refcount") || $0.contains("MetadataTransaction"))
        }
        #expect(files.count >= 4, "\(files)")
        let pattern = try NSRegularExpression(pattern: #""[^"]*(qimg [a-z]|--[a-z]|-r (all|leaks))[^"]*""#)
        for f in files {
            for (i, line) in try String(contentsOfFile: dir + "/" + f, encoding: .utf8).split(separator: "\n").enumerated() {
                let s = String(line)
                if s.trimmingCharacters(in: .whitespaces).hasPrefix("//") { continue }
                let hit = pattern.firstMatch(in: s, range: NSRange(s.startIndex..., in: s))
                #expect(hit == nil, "\(f):\(i + 1) names a CLI flag: \(s)")
            }
        }
    }
}
