import Foundation
import Testing
import TestSupport

/// Persistent dirty bitmaps against QEMU: what qimg reads equals what QEMU exports
/// through NBD, what qimg writes QEMU reads back exactly, and qimg's `bitmap`
/// actions leave the same image metadata as qemu-img's.
@Suite struct BitmapTests {
    static func scratch(_ name: String) throws -> String { try Paths.newScratch("bitmap-\(name)") }

    static func sh(_ args: [String], _ dir: String) throws -> RunResult { try Runner.qemuStep(args, in: dir) }

    static var nbdinfo: String? { Env.which("nbdinfo") }
    static var qemuNBD: String? { Env.which("qemu-nbd") }

    /// Dirty extents of `bitmap` as QEMU exports them (qemu-nbd -B, read with nbdinfo).
    static func qemuExtents(_ file: String, _ bitmap: String, _ dir: String) throws -> [[UInt64]] {
        guard let nbdinfo, let qemuNBD else {
            throw TestFailure("nbdinfo/qemu-nbd not found (install libnbd-bin and qemu-utils)")
        }
        let r = try Runner.run(nbdinfo, ["--json", "--map=qemu:dirty-bitmap:\(bitmap)", "--", "[", qemuNBD, "-r", "-f", "qcow2", "-B", bitmap, file, "]"], cwd: dir)
        guard r.status == 0 else { throw TestFailure("nbdinfo: \(r.err)") }
        let list = try JSONSerialization.jsonObject(with: r.stdout) as? [[String: Any]] ?? []
        return list.filter { ($0["type"] as? Int) == 1 }.map { [($0["offset"] as! NSNumber).uint64Value, ($0["length"] as! NSNumber).uint64Value] }
    }

    /// Dirty extents as `qimg bitmap --dump --output=json` reports them.
    static func qimgExtents(_ file: String, _ bitmap: String, _ dir: String) throws -> [[UInt64]] {
        let r = try Qimg.run(["bitmap", "--dump", "--output=json", file, bitmap], cwd: dir)
        guard r.status == 0 else { throw TestFailure("qimg bitmap --dump: \(r.err)") }
        let obj = try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any] ?? [:]
        let ext = obj["extents"] as? [[String: Any]] ?? []
        return ext.map { [($0["start"] as! NSNumber).uint64Value, ($0["length"] as! NSNumber).uint64Value] }
    }

    static func info(_ file: String, _ dir: String) throws -> String {
        try Runner.qemuImg(["info", "--output=json", file], cwd: dir).out.split(separator: "\n")
            .filter { !$0.contains("\"filename\"") && !$0.contains("\"actual-size\"") }.joined(separator: "\n")
    }

    /// QEMU dirties bitmaps (data, zero and discard writes); qimg reads exactly what QEMU exports.
    @Test(.requiresQEMU, arguments: [("4k", "512"), ("64k", "4k"), ("64k", "64k"), ("2M", "1M"), ("64k", "1M")])
    func qemuWritesQimgDumps(_ cluster: String, _ granularity: String) throws {
        let dir = try Self.scratch("q2m")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try Self.sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=\(cluster)", "img.qcow2", "40M"], dir)
        _ = try Self.sh(["qemu-img", "bitmap", "--add", "-g", granularity, "img.qcow2", "b"], dir)
        _ = try Self.sh(["qemu-io", "-c", "write -P 1 1000 5000", "-c", "write -z 3M 300k", "-c", "discard 8M 2M",
                         "-c", "write -P 2 20M 1", "-c", "write -P 3 39M 1M", "img.qcow2"], dir)
        let theirExtents = try Self.qemuExtents("img.qcow2", "b", dir)
        #expect(theirExtents.count >= 4, "QEMU should have recorded the writes: \(theirExtents)")
        #expect(try Self.qimgExtents("img.qcow2", "b", dir) == theirExtents)
        let ours = try Qimg.run(["info", "--output=json", "img.qcow2"], cwd: dir)
        let theirs = try Runner.qemuImg(["info", "--output=json", "img.qcow2"], cwd: dir)
        #expect(ours.out == theirs.out)
    }

    /// qimg dirties bitmaps through writes; QEMU exports exactly the granules a shadow model predicts.
    @Test(.requiresQEMU, arguments: [512, 4096, 65536, 1 << 20])
    func qimgWritesQemuReads(_ granularity: Int) throws {
        let dir = try Self.scratch("m2q")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size: UInt64 = 24 << 20
        _ = try Qimg.run(["create", "-q", "-f", "qcow2", "img.qcow2", "24M"], cwd: dir)
        let add = try Qimg.run(["bitmap", "--add", "-g", String(granularity), "img.qcow2", "b"], cwd: dir)
        #expect(add.status == 0, "\(add.err)")
        _ = try Qimg.run(["bitmap", "--add", "--disable", "img.qcow2", "off"], cwd: dir)
        var rng = SeededRNG(state: UInt64(granularity))
        var shadow = [Bool](repeating: false, count: Int((size + UInt64(granularity) - 1) / UInt64(granularity)))
        for round in 0..<2 {
            var commands: [String] = []
            for _ in 0..<12 {
                let off = UInt64.random(in: 0..<size, using: &rng)
                let len = min(size - off, UInt64.random(in: 1...400_000, using: &rng))
                switch UInt64.random(in: 0..<4, using: &rng) {
                case 0: commands.append("write -z \(off) \(len)")
                case 1: commands.append("discard \(off) \(len)")
                default: commands.append("write -P 7 \(off) \(len)")
                }
                for g in Int(off / UInt64(granularity))...Int((off + len - 1) / UInt64(granularity)) { shadow[g] = true }
            }
            let r = try Qimg.run(["io"] + commands.flatMap { ["-c", $0] } + ["img.qcow2"], cwd: dir)
            #expect(r.status == 0, "round \(round): \(r.err)")
        }
        var expected: [[UInt64]] = []
        var g = 0
        while g < shadow.count {
            guard shadow[g] else { g += 1; continue }
            let start = g
            while g < shadow.count && shadow[g] { g += 1 }
            let a = UInt64(start) * UInt64(granularity), b = min(size, UInt64(g) * UInt64(granularity))
            expected.append([a, b - a])
        }
        #expect(try Self.qemuExtents("img.qcow2", "b", dir) == expected)
        #expect(try Self.qimgExtents("img.qcow2", "b", dir) == expected)
        #expect(try Self.qemuExtents("img.qcow2", "off", dir) == [])
        try expectCheckClean("img.qcow2", dir, "qimg's bitmaps")
        #expect(try Qimg.run(["info", "--output=json", "img.qcow2"], cwd: dir).out == (try Runner.qemuImg(["info", "--output=json", "img.qcow2"], cwd: dir).out))
    }

    /// The same action sequence run by qemu-img on one copy and qimg on another.
    @Test(.requiresQEMU) func actionSequencesMatchQemuImg() throws {
        let dir = try Self.scratch("seq")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for n in ["q", "m"] {
            _ = try Self.sh(["qemu-img", "create", "-q", "-f", "qcow2", "\(n).qcow2", "64M"], dir)
            _ = try Self.sh(["qemu-img", "create", "-q", "-f", "qcow2", "src-\(n).qcow2", "64M"], dir)
            _ = try Self.sh(["qemu-img", "bitmap", "--add", "src-\(n).qcow2", "s"], dir)
            _ = try Self.sh(["qemu-io", "-c", "write 5M 64k", "src-\(n).qcow2"], dir)
        }
        let steps: [([String], String)] = [
            (["--add"], "b0"), (["--add", "-g", "512"], "b1"), (["--add", "--disable"], "b2"),
            (["--disable"], "b0"), (["--enable"], "b0"), (["--merge", "b1"], "b2"), (["--clear"], "b0"),
            (["--remove"], "b1"), (["--add", "--merge", "b2"], "b3"), (["--merge", "s", "-b", "src-X.qcow2", "-F", "qcow2"], "b0"),
            (["--add", "-g", "2M", "--disable", "--clear"], "b4"),
        ]
        for (args, name) in steps {
            if args == ["--clear"] {
                _ = try Self.sh(["qemu-io", "-c", "write 0 64k", "-c", "write 1M 4k", "q.qcow2"], dir)
                _ = try Qimg.run(["io", "-c", "write 0 64k", "-c", "write 1M 4k", "m.qcow2"], cwd: dir)
            }
            let q = try Runner.qemuImg(["bitmap"] + args.map { $0.replacingOccurrences(of: "X", with: "q") } + ["q.qcow2", name], cwd: dir)
            let m = try Qimg.run(["bitmap"] + args.map { $0.replacingOccurrences(of: "X", with: "m") } + ["m.qcow2", name], cwd: dir)
            #expect(q.status == 0 && m.status == 0, "\(args) \(name): \(m.err)")
            #expect(try Self.info("m.qcow2", dir) == (try Self.info("q.qcow2", dir)), "after \(args) \(name)")
            try expectCheckClean("m.qcow2", dir, "after \(args) \(name)")
        }
        for b in ["b0", "b2", "b3", "b4"] {
            #expect(try Self.qemuExtents("m.qcow2", b, dir) == (try Self.qemuExtents("q.qcow2", b, dir)), "bitmap \(b)")
        }
    }

    /// Invalid actions fail with one clear line and leave the file byte-identical,
    /// even when earlier actions of the same command succeeded.
    @Test(.requiresQEMU, arguments: [
        ["--add", "img.qcow2", "b0"], ["--remove", "img.qcow2", "nope"], ["--add", "-g", "256", "img.qcow2", "g"],
        ["--add", "-g", "4G", "img.qcow2", "g"], ["--add", "img.qcow2", String(repeating: "x", count: 1024)],
        ["--merge", "nope", "img.qcow2", "b0"], ["--merge", "s", "-b", "absent.qcow2", "-F", "qcow2", "img.qcow2", "b0"],
        ["--add", "--enable", "--merge", "nope", "img.qcow2", "fresh"], ["--clear", "--remove", "--clear", "img.qcow2", "b0"],
        ["--add", "v2.qcow2", "b"], ["img.qcow2", "b0"], ["--enable", "img.qcow2", "b1"],
        // the bitmaps extension would not fit in the header cluster (qemu-img 7.2 exits 0
        // there, saying "Lost persistent bitmaps", and leaks the clusters it wrote)
        ["--add", "full.qcow2", "x"],
    ])
    func invalidActionsChangeNothing(_ args: [String]) throws {
        let dir = try Self.scratch("bad")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try Self.sh(["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "16M"], dir)
        _ = try Self.sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "16M"], dir)
        _ = try Self.sh(["qemu-img", "bitmap", "--add", "img.qcow2", "b0"], dir)
        _ = try Self.sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-u",
                         "-b", String(repeating: "b", count: 370), "-F", "raw", "full.qcow2", "1M"], dir)
        // b1 is left in use the way a crashed QEMU leaves it.
        _ = try Self.sh(["qemu-img", "bitmap", "--add", "img.qcow2", "b1"], dir)
        _ = try Runner.qemuIO(["-c", "write 0 4k", "-c", "abort", "img.qcow2"], cwd: dir)
        let target = args[args.count - 2]  // FILE and NAME come last
        let before = try Data(contentsOf: URL(fileURLWithPath: dir + "/" + target))
        let r = try Qimg.run(["bitmap"] + args, cwd: dir)
        #expect(r.status == 1 && r.stderrLines.count == 1 && r.err.hasPrefix("qimg: "), "\(args): \(r.status) \(r.err)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir + "/" + target)) == before, "\(args) changed the file")
    }

    /// A bitmap QEMU left in use: listed as in-use, refused for every use but removal.
    @Test(.requiresQEMU) func inconsistentBitmapIsOnlyRemovable() throws {
        let dir = try Self.scratch("inuse")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try Self.sh(["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "16M"], dir)
        _ = try Self.sh(["qemu-img", "bitmap", "--add", "img.qcow2", "b"], dir)
        _ = try Runner.qemuIO(["-c", "write 0 4k", "-c", "abort", "img.qcow2"], cwd: dir)
        // The dirty bit of the aborted session needs no repair here (no lazy refcounts).
        let info = try Qimg.run(["info", "img.qcow2"], cwd: dir)
        #expect(info.out == (try Runner.qemuImg(["info", "img.qcow2"], cwd: dir).out))
        #expect(info.out.contains("in-use"))
        for args in [["--dump"], ["--clear"], ["--enable"], ["--disable"]] {
            let r = try Qimg.run(["bitmap"] + args + ["img.qcow2", "b"], cwd: dir)
            #expect(r.status == 1 && r.err.contains("inconsistent"), "\(args): \(r.err)")
        }
        let q = try Qimg.run(["check", "img.qcow2"], cwd: dir)
        let qc = try Runner.qemuImg(["check", "img.qcow2"], cwd: dir)
        #expect(q.status == 0 && q.out == qc.out)
        let rm = try Qimg.run(["bitmap", "--remove", "img.qcow2", "b"], cwd: dir)
        #expect(rm.status == 0, "\(rm.err)")
        #expect(!(try Runner.qemuImg(["info", "img.qcow2"], cwd: dir).out.contains("bitmaps")))
        try expectCheckClean("img.qcow2", dir, "after --remove")
    }
}
