import Foundation
import Testing
import TestSupport

/// Seeded random workloads through `qimg io` (writes with patterns, zero writes with
/// and without unmap, discards; unaligned offsets and lengths) on images of many
/// kinds. After each workload `qemu-img check` must report no errors and no leaks,
/// and `qemu-img convert -O raw` must equal a shadow raw image the test maintains.

struct WorkloadCase: Sendable, CustomTestStringConvertible {
    var name: String
    /// Commands (qemu-img / qemu-io argument lists, first word the tool) that build `img.qcow2` in a fresh dir.
    var setup: [[String]]
    var clusterSize: UInt64
    /// Zero writes work at this granularity (the subcluster size with extended L2); discards at clusters.
    var granule: UInt64
    var version: Int = 3
    var hasBacking = false
    var seed: UInt64
    var testDescription: String { name }

    static let all: [WorkloadCase] = [
        WorkloadCase(name: "v3-64k", setup: [["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "24M"]],
                     clusterSize: 65536, granule: 65536, seed: 1),
        WorkloadCase(name: "v2-64k", setup: [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "img.qcow2", "16M"]],
                     clusterSize: 65536, granule: 65536, version: 2, seed: 2),
        WorkloadCase(name: "c512", setup: [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "img.qcow2", "4M"]],
                     clusterSize: 512, granule: 512, seed: 3),
        WorkloadCase(name: "c4k-rb1", setup: [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=1", "img.qcow2", "8M"]],
                     clusterSize: 4096, granule: 4096, seed: 4),
        WorkloadCase(name: "c512-rb64-growth", setup: [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", "img.qcow2", "8M"]],
                     clusterSize: 512, granule: 512, seed: 5),
        WorkloadCase(name: "c2m", setup: [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "img.qcow2", "24M"]],
                     clusterSize: 2 << 20, granule: 2 << 20, seed: 6),
        WorkloadCase(name: "xl2-64k", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "img.qcow2", "16M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x21 5000 70000", "-c", "write -z 300k 6k", "img.qcow2"],
        ], clusterSize: 65536, granule: 2048, seed: 7),
        WorkloadCase(name: "xl2-16k-on-backing", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "8M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 3M", "-c", "write -P 0x32 5M 1M", "base.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=16k", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2"],
        ], clusterSize: 16384, granule: 512, hasBacking: true, seed: 8),
        WorkloadCase(name: "backing-qcow2", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "8M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 2M", "-c", "write -P 0x42 6M 1500k", "base.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2"],
        ], clusterSize: 65536, granule: 65536, hasBacking: true, seed: 9),
        WorkloadCase(name: "v2-on-short-raw", setup: [
            ["qemu-img", "create", "-q", "-f", "raw", "base.raw", "3000000"],
            ["qemu-io", "-f", "raw", "-c", "write -P 0x51 0 2900000", "base.raw"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.raw", "-F", "raw", "img.qcow2", "8M"],
        ], clusterSize: 65536, granule: 65536, version: 2, hasBacking: true, seed: 10),
        WorkloadCase(name: "compressed-zlib", setup: [
            ["qemu-img", "create", "-q", "-f", "raw", "src.raw", "8M"],
            ["qemu-io", "-f", "raw", "-c", "write -P 0x61 0 3M", "-c", "write -P 0x62 4M 2M", "src.raw"],
            ["qemu-img", "convert", "-c", "-O", "qcow2", "src.raw", "img.qcow2"],
        ], clusterSize: 65536, granule: 65536, seed: 11),
        WorkloadCase(name: "compressed-zstd-xl2", setup: [
            ["qemu-img", "create", "-q", "-f", "raw", "src.raw", "8M"],
            ["qemu-io", "-f", "raw", "-c", "write -P 0x71 0 5M", "src.raw"],
            ["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,extended_l2=on", "src.raw", "img.qcow2"],
        ], clusterSize: 65536, granule: 2048, seed: 12),
        WorkloadCase(name: "snapshot", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "16M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x81 0 4M", "-c", "write -P 0x82 10M 1M", "img.qcow2"],
            ["qemu-img", "snapshot", "-c", "s1", "img.qcow2"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x83 1M 64k", "img.qcow2"],
        ], clusterSize: 65536, granule: 65536, seed: 13),
        WorkloadCase(name: "snapshot-shared-l2", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "16M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x84 0 6M", "-c", "write -c -P 0x85 8M 128k", "img.qcow2"],
            ["qemu-img", "snapshot", "-c", "s1", "img.qcow2"],
        ], clusterSize: 65536, granule: 65536, seed: 16),
        WorkloadCase(name: "lazy-refcounts", setup: [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "img.qcow2", "16M"]],
                     clusterSize: 65536, granule: 65536, seed: 14),
        WorkloadCase(name: "bitmaps-present", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "16M"],
            ["qemu-img", "bitmap", "--add", "img.qcow2", "b0"],
            ["qemu-img", "bitmap", "--add", "--disable", "img.qcow2", "off"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x91 0 1M", "img.qcow2"],
        ], clusterSize: 65536, granule: 65536, seed: 15),
    ]
}

@Suite struct WriteWorkloadTests {
    static func tool(_ args: [String], cwd: String) throws -> RunResult { try Runner.qemuStep(args, in: cwd) }

    static func rawContent(_ dir: String) throws -> [UInt8] {
        _ = try tool(["qemu-img", "convert", "-O", "raw", "img.qcow2", "out.raw"], cwd: dir)
        defer { try? FileManager.default.removeItem(atPath: dir + "/out.raw") }
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir + "/out.raw")))
    }

    @Test(.requiresQEMU, arguments: WorkloadCase.all)
    func randomWorkloadKeepsImageConsistent(_ w: WorkloadCase) throws {
        let dir = try Paths.newScratch("workload-\(w.name)")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for cmd in w.setup { _ = try Self.tool(cmd, cwd: dir) }
        var shadow = try Self.rawContent(dir)
        let size = UInt64(shadow.count)
        var rng = SeededRNG(state: w.seed)

        for round in 0..<3 {
            var commands: [String] = []
            for _ in 0..<14 {
                let maxLen = min(size, max(w.clusterSize * 3, 300_000))
                var len = UInt64.random(in: 1...maxLen, using: &rng)
                var off = UInt64.random(in: 0..<size, using: &rng)
                if Bool.random(using: &rng) { off &= ~(w.granule - 1) }  // aligned starts half the time
                if Bool.random(using: &rng) { len = max(w.granule, len & ~(w.granule - 1)) }
                len = min(len, size - off)
                switch UInt64.random(in: 0..<11, using: &rng) {
                case 10:
                    // Compressed: whole clusters (the last one may end at the disk end).
                    let cs = w.clusterSize
                    let first = off / cs
                    let count = min(UInt64.random(in: 1...2, using: &rng), (size - first * cs + cs - 1) / cs)
                    let start = first * cs
                    let length = min(count * cs, size - start)
                    let p = UInt8.random(in: 1...255, using: &rng)
                    commands.append("write -c -P \(p) \(start) \(length)")
                    for i in start..<(start + length) { shadow[Int(i)] = p }
                case 0..<6:
                    let p = UInt8.random(in: 1...255, using: &rng)
                    commands.append("write -P \(p) \(off) \(len)")
                    for i in off..<(off + len) { shadow[Int(i)] = p }
                case 6, 7:
                    let unmap = Bool.random(using: &rng)
                    commands.append("write -z\(unmap ? " -u" : "") \(off) \(len)")
                    for i in off..<(off + len) { shadow[Int(i)] = 0 }
                default:
                    commands.append("discard \(off) \(len)")
                    // Whole clusters read as zeros afterwards, except on v2 images with a backing file.
                    if !(w.version == 2 && w.hasBacking) {
                        let cs = w.clusterSize
                        let a = (off + cs - 1) & ~(cs - 1)
                        let b = min(size, (off + len) & ~(cs - 1))
                        let end = b
                        if a < end { for i in a..<end { shadow[Int(i)] = 0 } }
                    }
                }
            }
            let r = try Qimg.run(["io"] + commands.flatMap { ["-c", $0] } + ["img.qcow2"], cwd: dir, timeout: 120)
            #expect(r.status == 0, "\(w.name) round \(round): \(r.summary)\n\(r.err)\ncommands: \(commands)")
            guard r.status == 0 else { return }

            try expectCheckClean("img.qcow2", dir, "\(w.name) round \(round) (commands: \(commands))")
            let content = try Self.rawContent(dir)
            if content != shadow {
                let first = (0..<min(content.count, shadow.count)).first { content[$0] != shadow[$0] } ?? min(content.count, shadow.count)
                Issue.record("\(w.name) round \(round): content differs from the shadow at byte \(first) (qemu \(first < content.count ? content[first] : 0), shadow \(first < shadow.count ? shadow[first] : 0))\ncommands: \(commands)")
                return
            }
        }
    }

    /// Enabled bitmaps record a qimg write and stay consistent after a clean close;
    /// disabled ones stay as they are.
    @Test(.requiresQEMU) func writeKeepsEnabledBitmapsConsistent() throws {
        let dir = try Paths.newScratch("bitmap-inuse")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for cmd in WorkloadCase.all.first(where: { $0.name == "bitmaps-present" })!.setup { _ = try Self.tool(cmd, cwd: dir) }
        let r = try Qimg.run(["io", "-c", "write -P 1 0 4k", "img.qcow2"], cwd: dir)
        #expect(r.status == 0, "\(r.err)")
        let info = try Runner.qemuImg(["info", "--output=json", "img.qcow2"], cwd: dir)
        let json = try JSONSerialization.jsonObject(with: info.stdout) as? [String: Any]
        let data = (json?["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        let bitmaps = data?["bitmaps"] as? [[String: Any]] ?? []
        let flags = Dictionary(uniqueKeysWithValues: bitmaps.map { ($0["name"] as? String ?? "", $0["flags"] as? [String] ?? []) })
        #expect(flags["b0"] == ["auto"])
        #expect(flags["off"] == [])
        try expectCheckClean("img.qcow2", dir, "after the write")
    }
}
