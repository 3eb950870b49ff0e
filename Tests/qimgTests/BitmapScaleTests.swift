import Foundation
import Testing
import TestSupport

/// Persistent bitmaps at scale: a 4 TiB disk (bitmap work must follow the dirty areas,
/// not the disk size, in time and memory) and an image holding 1000 bitmaps.
@Suite struct BitmapScaleTests {
    /// CPU time (user + system) of each bitmap command on the 4 TiB disk, in this debug
    /// build. CPU time, not wall-clock time: a loaded machine slows a command down without
    /// making it use more CPU, while work that followed the disk size would still show.
    static let maxCPUSeconds = 5.0
    /// Peak RSS of each such command (GNU time's %M, KiB).
    static let maxRSSKiB = 64 * 1024 * Env.memoryBoundScale
    static let gnuTime = "/usr/bin/time"

    static func scratch(_ name: String) throws -> String { try Paths.newScratch("bitmap-scale-\(name)") }

    static func ok(_ r: RunResult) throws -> RunResult {
        guard r.exitedNormally, r.status == 0 else { throw TestFailure("\(r.summary): \(r.out)\(r.err)") }
        return r
    }

    /// Runs qimg under GNU time: the result, CPU seconds (user + system) and peak RSS in KiB.
    static func measured(_ args: [String], cwd: String) throws -> (RunResult, cpuSeconds: Double, rssKiB: Int) {
        guard FileManager.default.isExecutableFile(atPath: gnuTime) else {
            throw TestFailure("GNU time not found at \(gnuTime) (install the 'time' package)")
        }
        guard FileManager.default.isExecutableFile(atPath: Qimg.path) else {
            throw TestFailure("qimg binary not found at \(Qimg.path): run `swift build` first")
        }
        let rssFile = cwd + "/rss-\(UUID().uuidString.prefix(8)).txt"
        defer { try? FileManager.default.removeItem(atPath: rssFile) }
        let r = try Runner.run(gnuTime, ["-f", "%M %U %S", "-o", rssFile, Qimg.path] + args, cwd: cwd, timeout: 60)
        let text = (try? String(contentsOfFile: rssFile, encoding: .utf8)) ?? ""
        let fields = text.split(separator: "\n").last?.split(separator: " ") ?? []
        guard fields.count == 3, let rss = Int(fields[0]), let user = Double(fields[1]), let system = Double(fields[2]) else {
            throw TestFailure("\(gnuTime) wrote no '%M %U %S' line for qimg \(args.joined(separator: " ")): '\(text)'")
        }
        return (r, user + system, rss)
    }

    /// Runs a qimg command that must succeed within the time and memory limits.
    @discardableResult
    static func bounded(_ args: [String], cwd: String, sourceLocation: SourceLocation = #_sourceLocation) throws -> RunResult {
        let (r, cpu, rss) = try measured(args, cwd: cwd)
        let label = "qimg " + args.joined(separator: " ")
        guard r.exitedNormally, r.status == 0 else { throw TestFailure("\(label): \(r.summary): \(r.err)") }
        #expect(cpu < maxCPUSeconds, "\(label) used \(String(format: "%.2f", cpu)) s of CPU", sourceLocation: sourceLocation)
        #expect(rss < maxRSSKiB, "\(label): peak RSS \(rss / 1024) MiB", sourceLocation: sourceLocation)
        return r
    }

    /// The dirty extents a bitmap of `granularity` must hold after writes to `ranges`:
    /// granule-aligned, merged, clipped to the disk size.
    static func extents(_ ranges: [(UInt64, UInt64)], granularity g: UInt64, size: UInt64) -> [[UInt64]] {
        let aligned = ranges.filter { $0.1 > 0 }
            .map { (($0.0 / g) * g, min(size, ($0.0 + $0.1 + g - 1) / g * g)) }
            .sorted { $0.0 < $1.0 }
        var out: [[UInt64]] = []
        for (a, b) in aligned {
            if let last = out.last, a <= last[0] + last[1] {
                out[out.count - 1][1] = max(last[0] + last[1], b) - last[0]
            } else {
                out.append([a, b - a])
            }
        }
        return out
    }

    /// `qemu-img info --output=json` bitmaps: name, flags, granularity, in directory order.
    static func listedBitmaps(_ file: String, _ dir: String) throws -> [(name: String, flags: [String], granularity: UInt64)] {
        let r = try ok(Runner.qemuImg(["info", "--output=json", file], cwd: dir))
        let json = try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any] ?? [:]
        let data = (json["format-specific"] as? [String: Any])?["data"] as? [String: Any] ?? [:]
        return (data["bitmaps"] as? [[String: Any]] ?? []).map {
            ($0["name"] as? String ?? "", $0["flags"] as? [String] ?? [], ($0["granularity"] as? NSNumber)?.uint64Value ?? 0)
        }
    }

    /// A 4 TiB sparse disk with data spread over it: add, track writes (including a 40 GiB
    /// discard and a 3 GiB zero write), dump, merge into a new bitmap, clear and remove;
    /// each within seconds of CPU time and a small peak RSS, and QEMU exports the extents qimg dumps.
    @Test(.requiresQEMU) func fourTebibyteDisk() throws {
        let dir = try Self.scratch("4t")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size: UInt64 = 4 << 40
        let g: UInt64 = 65536
        _ = try Self.ok(Runner.qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "big.qcow2", String(size)], cwd: dir))
        // Data everywhere before any bitmap exists: 20 small writes, one per 1/20 of the disk.
        var setup: [String] = []
        for i in 0..<20 as Range<UInt64> {
            setup += ["-c", "write -P \(i + 1) \(i * (size / 20) + i * 4099) \(4096 + i * 3000)"]
        }
        _ = try Self.ok(Runner.qemuIO(["-f", "qcow2"] + setup + ["big.qcow2"], cwd: dir))

        try Self.bounded(["bitmap", "--add", "-g", "64K", "big.qcow2", "b1"], cwd: dir)
        #expect(try BitmapTests.qemuExtents("big.qcow2", "b1", dir) == [])

        // Guest writes tracked by qimg: small ones spread over the disk (some straddling
        // an L2 table boundary, the last byte of the disk), a large discard and zero write.
        var ranges: [(UInt64, UInt64)] = []
        var rng = SeededRNG(state: 0x4_7E1B)
        var io: [String] = []
        for i in 0..<20 as Range<UInt64> {
            let off = i * (size / 20) + UInt64.random(in: 0..<(size / 20 - (1 << 20)), using: &rng)
            let len = UInt64.random(in: 1...200_000, using: &rng)
            io += ["-c", i % 5 == 4 ? "write -z \(off) \(len)" : "write -P \(0x40 + i) \(off) \(len)"]
            ranges.append((off, len))
        }
        let fixed: [(String, UInt64, UInt64)] = [
            ("write -P 0x77", (512 << 20) - 4096, 8192),     // across the first L2 boundary
            ("discard", 100 << 30, 40 << 30),                 // more than one bitmap data cluster covers
            ("write -z", 200 << 30, 3 << 30),
            ("write -P 0x78", size - 1, 1),
        ]
        for (cmd, off, len) in fixed {
            io += ["-c", "\(cmd) \(off) \(len)"]
            ranges.append((off, len))
        }
        try Self.bounded(["io"] + io + ["big.qcow2"], cwd: dir)
        let expected = Self.extents(ranges, granularity: g, size: size)

        let dump = try Self.bounded(["bitmap", "--dump", "--output=json", "big.qcow2", "b1"], cwd: dir)
        let dumped = try JSONSerialization.jsonObject(with: dump.stdout) as? [String: Any] ?? [:]
        let dumpedExtents = (dumped["extents"] as? [[String: Any]] ?? []).map {
            [($0["start"] as! NSNumber).uint64Value, ($0["length"] as! NSNumber).uint64Value]
        }
        #expect(dumpedExtents == expected)
        #expect((dumped["dirty-bytes"] as? NSNumber)?.uint64Value == expected.reduce(0) { $0 + $1[1] })
        #expect(try BitmapTests.qemuExtents("big.qcow2", "b1", dir) == expected)

        // A second bitmap takes b1's content by merge.
        try Self.bounded(["bitmap", "--add", "-g", "64K", "big.qcow2", "b2"], cwd: dir)
        try Self.bounded(["bitmap", "--merge", "b1", "big.qcow2", "b2"], cwd: dir)
        #expect(try BitmapTests.qemuExtents("big.qcow2", "b2", dir) == expected)

        try Self.bounded(["bitmap", "--clear", "big.qcow2", "b1"], cwd: dir)
        #expect(try BitmapTests.qemuExtents("big.qcow2", "b1", dir) == [])
        #expect(try BitmapTests.qimgExtents("big.qcow2", "b1", dir) == [])
        // One more write dirties both: b1 has only it, b2 the union.
        let late: (UInt64, UInt64) = (3 << 40, 100_000)
        try Self.bounded(["io", "-c", "write -P 0x79 \(late.0) \(late.1)", "big.qcow2"], cwd: dir)
        #expect(try BitmapTests.qemuExtents("big.qcow2", "b1", dir) == Self.extents([late], granularity: g, size: size))
        let union = Self.extents(ranges + [late], granularity: g, size: size)
        #expect(try BitmapTests.qemuExtents("big.qcow2", "b2", dir) == union)
        #expect(try BitmapTests.qimgExtents("big.qcow2", "b2", dir) == union)
        try expectCheckClean("big.qcow2", dir, "before removal")
        let ours = try Qimg.run(["info", "--output=json", "big.qcow2"], cwd: dir)
        #expect(ours.out == (try Runner.qemuImg(["info", "--output=json", "big.qcow2"], cwd: dir).out))

        try Self.bounded(["bitmap", "--remove", "big.qcow2", "b1"], cwd: dir)
        try Self.bounded(["bitmap", "--remove", "big.qcow2", "b2"], cwd: dir)
        #expect(try Self.listedBitmaps("big.qcow2", dir).isEmpty)
        try expectCheckClean("big.qcow2", dir, "after removal")
    }

    /// An incremental backup of the 4 TiB disk takes the same memory for 8 dirty clusters
    /// as for 608, one per 4 GiB (each in an L2 table of its own), but for the bitmap's own
    /// chunks (32 KiB per 16 GiB of disk with a bit set: under 5 MiB here). It grew by every
    /// L2 table read (the 32 MiB cache filling up) and by a second bitmap of what was copied.
    /// QEMU reads the backups: clean, and the larger one holds exactly the source's data.
    @Test(.requiresQEMU) func incrementalBackupMemoryDoesNotFollowTheDirtyData() throws {
        let dir = try Self.scratch("4t-backup")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size = "4T"
        for name in ["src.qcow2", "base.qcow2"] {
            _ = try Self.ok(Runner.qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", name, size], cwd: dir))
        }
        // Bitmap "many" sees 600 + 8 cluster writes, bitmap "few" only the last 8.
        _ = try Self.ok(Runner.qemuImg(["bitmap", "--add", "-g", "64K", "src.qcow2", "many"], cwd: dir))
        let spread = (0..<600 as Range<UInt64>).flatMap { i in ["-c", "write -P \(i % 250 + 1) \((i << 32) + (i % 7) << 16) 64k"] }
        _ = try Self.ok(Runner.qemuIO(["-f", "qcow2"] + spread + ["src.qcow2"], cwd: dir))
        _ = try Self.ok(Runner.qemuImg(["bitmap", "--add", "-g", "64K", "src.qcow2", "few"], cwd: dir))
        let late = (0..<8 as Range<UInt64>).flatMap { i in ["-c", "write -P 0xee \((i << 39) + (2 << 30)) 64k"] }
        _ = try Self.ok(Runner.qemuIO(["-f", "qcow2"] + late + ["src.qcow2"], cwd: dir))

        var peak: [String: Int] = [:]
        for bitmap in ["few", "many"] {
            let args = ["backup", "-q", "--sync=incremental", "--bitmap=\(bitmap)", "-b", "base.qcow2", "-F", "qcow2", "src.qcow2", "\(bitmap).qcow2"]
            let (r, _, rss) = try Self.measured(args, cwd: dir)
            #expect(r.exitedNormally && r.status == 0, "\(r.summary): \(r.err)")
            peak[bitmap] = rss
            try expectCheckClean("\(bitmap).qcow2", dir, "backup of bitmap \(bitmap)")
        }
        let growthKiB = (peak["many"] ?? 0) - (peak["few"] ?? 0)
        #expect(growthKiB < 16 * 1024 * Env.memoryBoundScale, "peak RSS \(peak): grew by \(growthKiB / 1024) MiB with the dirty data")
        // The larger backup (over an empty base) reads as the source; the smaller holds 8 clusters.
        #expect(try Runner.qemuImg(["compare", "src.qcow2", "many.qcow2"], cwd: dir).status == 0)
        let map = try Self.ok(Runner.qemuImg(["map", "--output=json", "few.qcow2"], cwd: dir))
        let entries = try JSONSerialization.jsonObject(with: map.stdout) as? [[String: Any]] ?? []
        #expect(entries.filter { ($0["depth"] as? NSNumber)?.intValue == 0 && ($0["data"] as? NSNumber)?.boolValue == true }.count == 8)
    }

    /// Regression: the human `--dump` multiplied offsets by its 64 columns in 64 bits and
    /// trapped (SIGILL) on a disk past 2^58 bytes with a dirty granule there. A 512 PiB disk
    /// (2 MiB clusters: an 8 MiB L1 table; qimg, like QEMU, caps the L1 table at 32 MiB,
    /// i.e. disks at 2^61 bytes) with a 2 GiB-granularity bitmap dirtied by QEMU at 2^58 and
    /// at the last byte: both outputs are complete, the map has '#' in columns 32 and 63, and
    /// the 17-digit offsets are followed by a space.
    @Test(.requiresQEMU) func dumpOfAHalfExbibyteDisk() throws {
        let dir = try Self.scratch("512p")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size: UInt64 = 1 << 59, g: UInt64 = 1 << 31
        _ = try Self.ok(Runner.qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "big.qcow2", String(size)], cwd: dir))
        _ = try Self.ok(Runner.qemuImg(["bitmap", "--add", "-g", String(g), "big.qcow2", "b"], cwd: dir))
        _ = try Self.ok(Runner.qemuIO(["-f", "qcow2", "-c", "write -P 7 \(size / 2) 64k", "-c", "write -P 8 \(size - 512) 512", "big.qcow2"], cwd: dir))

        let human = try Qimg.run(["bitmap", "--dump", "big.qcow2", "b"], cwd: dir)
        #expect(human.exitedNormally && human.status == 0 && human.err.isEmpty, "\(human.summary): \(human.err)")
        let columns = String(repeating: ".", count: 32) + "#" + String(repeating: ".", count: 30) + "#"
        #expect(human.out == """
            bitmap: b
            granularity: \(g)
            flags: auto
            dirty: \(2 * g) bytes (4 GiB) in 2 extents
            map: |\(columns)| (each column 8 PiB)
            Offset          Length
            0x\(String(size / 2, radix: 16)) 0x\(String(g, radix: 16))
            0x\(String(size - g, radix: 16)) 0x\(String(g, radix: 16))

            """)
        let json = try Qimg.run(["bitmap", "--dump", "--output=json", "big.qcow2", "b"], cwd: dir)
        #expect(json.exitedNormally && json.status == 0, "\(json.summary): \(json.err)")
        let dumped = try JSONSerialization.jsonObject(with: json.stdout) as? [String: Any] ?? [:]
        let extents = (dumped["extents"] as? [[String: Any]] ?? []).map {
            [($0["start"] as! NSNumber).uint64Value, ($0["length"] as! NSNumber).uint64Value]
        }
        #expect(extents == [[size / 2, g], [size - g, g]])
    }

    /// 1000 bitmaps added one by one with qimg (mixed granularities, every 7th disabled):
    /// QEMU lists them all, the image checks clean, one write dirties every enabled one,
    /// and qimg info matches qemu-img info.
    @Test(.requiresQEMU) func thousandBitmaps() throws {
        let dir = try Self.scratch("1000")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size: UInt64 = 64 << 20
        _ = try Self.ok(Runner.qemuImg(["create", "-q", "-f", "qcow2", "img.qcow2", String(size)], cwd: dir))
        let granularities: [UInt64] = [65536, 512, 4096, 1 << 20]
        func name(_ i: Int) -> String { "bitmap-" + String(1000 + i).dropFirst() }
        func disabled(_ i: Int) -> Bool { i % 7 == 3 }
        let start = Date()
        for i in 0..<1000 {
            // Each --add may use 2 s of CPU time (Runner's limit): one that rewrote work
            // proportional to all the bitmaps every time would not stay within it.
            let r = try Qimg.run(["bitmap", "--add", "-g", String(granularities[i % 4])]
                                 + (disabled(i) ? ["--disable"] : []) + ["img.qcow2", name(i)], cwd: dir, timeout: 2)
            guard r.exitedNormally, r.status == 0 else { throw TestFailure("adding bitmap \(i): \(r.summary): \(r.err)") }
        }
        print("BitmapScaleTests: 1000 x qimg bitmap --add in \(String(format: "%.1f", Date().timeIntervalSince(start))) s")

        let listed = try Self.listedBitmaps("img.qcow2", dir)
        #expect(listed.count == 1000)
        #expect(listed.map(\.name) == (0..<1000).map(name))
        for (i, b) in listed.enumerated() where i < 1000 {
            #expect(b.granularity == granularities[i % 4] && b.flags == (disabled(i) ? [] : ["auto"]), "\(b)")
        }
        try expectCheckClean("img.qcow2", dir, "after adding 1000 bitmaps")

        let write: (UInt64, UInt64) = ((3 << 20) + 1000, 70_000)
        try Self.bounded(["io", "-c", "write -P 5 \(write.0) \(write.1)", "img.qcow2"], cwd: dir)
        try expectCheckClean("img.qcow2", dir, "after the write")
        let after = try Self.listedBitmaps("img.qcow2", dir)
        #expect(after.count == 1000 && !after.contains { $0.flags.contains("in-use") })
        for i in [0, 1, 2, 3, 10, 499, 500, 997, 998, 999] {
            let ext = try BitmapTests.qemuExtents("img.qcow2", name(i), dir)
            let expected = disabled(i) ? [] : Self.extents([write], granularity: granularities[i % 4], size: size)
            #expect(ext == expected, "bitmap \(name(i)) (granularity \(granularities[i % 4]), \(disabled(i) ? "disabled" : "enabled"))")
            #expect(try BitmapTests.qimgExtents("img.qcow2", name(i), dir) == ext, "qimg --dump of \(name(i))")
        }
        let ours = try Qimg.run(["info", "--output=json", "img.qcow2"], cwd: dir)
        let theirs = try Runner.qemuImg(["info", "--output=json", "img.qcow2"], cwd: dir)
        #expect(ours.status == 0)
        if let d = Diff.firstDifference(theirs.out, ours.out) { Issue.record("qimg info --output=json: \(d)") }
    }
}
