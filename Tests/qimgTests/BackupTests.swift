import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// `qimg backup`: full and incremental backups as qcow2 overlay chains, checked with
/// QEMU's tools (compare, map, check), against qemu-storage-daemon's blockdev-backup,
/// and under failures (SIGKILL, SIGTERM, unwritable directories, a full disk): a failed
/// backup never loses bitmap bits and never leaves a TARGET behind.

// MARK: - Helpers

/// One guest operation of a workload, as a qemu-io / `qimg io` command.
private struct GuestOp {
    var command: String
    var offset: UInt64
    var length: UInt64
}

@Suite struct BackupTests {
    static let mib: UInt64 = 1 << 20

    static func scratch(_ name: String) throws -> String { try Paths.newScratch("backup-\(name)") }

    /// Runs qemu-img or qemu-io (first word), which must succeed.
    @discardableResult
    static func tool(_ args: [String], _ dir: String) throws -> RunResult { try Runner.qemuStep(args, in: dir) }

    /// Runs qimg, which must succeed.
    @discardableResult
    static func qimg(_ args: [String], _ dir: String, timeout: Double = 120) throws -> RunResult {
        let r = try Qimg.run(args, cwd: dir, timeout: timeout)
        guard r.exitedNormally, r.status == 0 else { throw TestFailure("\(r.summary): \(r.err)") }
        return r
    }

    static func exists(_ dir: String, _ name: String) -> Bool {
        FileManager.default.fileExists(atPath: dir + "/" + name)
    }

    static func bytes(_ dir: String, _ name: String) throws -> Data {
        try Data(contentsOf: URL(fileURLWithPath: dir + "/" + name))
    }

    /// `qimg bitmap --dump --output=json`: the whole text, the dirty byte count, the granularity and the extents.
    static func dump(_ file: String, _ bitmap: String, _ dir: String) throws -> (text: String, dirty: UInt64, granularity: UInt64, extents: [[UInt64]]) {
        let r = try qimg(["bitmap", "--dump", "--output=json", file, bitmap], dir)
        let obj = try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any] ?? [:]
        let dirty = (obj["dirty-bytes"] as? NSNumber)?.uint64Value ?? UInt64.max
        let granularity = (obj["granularity"] as? NSNumber)?.uint64Value ?? 0
        let ext = (obj["extents"] as? [[String: Any]] ?? []).map {
            [($0["start"] as! NSNumber).uint64Value, ($0["length"] as! NSNumber).uint64Value]
        }
        return (r.out, dirty, granularity, ext)
    }

    /// `qemu-img map --output=json` entries allocated in the top layer (depth 0, present),
    /// adjacent ones merged: [[start, length]].
    static func topLayer(_ file: String, _ dir: String) throws -> [[UInt64]] {
        let r = try tool(["qemu-img", "map", "--output=json", file], dir)
        let list = try JSONSerialization.jsonObject(with: r.stdout) as? [[String: Any]] ?? []
        var out: [[UInt64]] = []
        for e in list where (e["depth"] as? NSNumber)?.intValue == 0 && (e["present"] as? Bool) == true {
            let s = (e["start"] as! NSNumber).uint64Value, n = (e["length"] as! NSNumber).uint64Value
            if let last = out.last, last[0] + last[1] == s { out[out.count - 1][1] += n } else { out.append([s, n]) }
        }
        return out
    }

    /// `qemu-img map --output=json` ranges holding data (any depth), adjacent ones merged.
    static func dataRanges(_ file: String, _ dir: String) throws -> [[UInt64]] {
        let r = try tool(["qemu-img", "map", "--output=json", file], dir)
        let list = try JSONSerialization.jsonObject(with: r.stdout) as? [[String: Any]] ?? []
        var out: [[UInt64]] = []
        for e in list where (e["data"] as? Bool) == true {
            let s = (e["start"] as! NSNumber).uint64Value, n = (e["length"] as! NSNumber).uint64Value
            if let last = out.last, last[0] + last[1] == s { out[out.count - 1][1] += n } else { out.append([s, n]) }
        }
        return out
    }

    static func backingFile(_ file: String, _ dir: String) throws -> String? {
        let r = try tool(["qemu-img", "info", "--output=json", file], dir)
        let obj = try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any] ?? [:]
        return obj["backing-filename"] as? String
    }

    /// `qemu-img compare` says the two read the same (through their backing chains).
    static func expectIdentical(_ a: String, _ b: String, _ dir: String, _ label: String,
                                sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try Runner.qemuImg(["compare", a, b], cwd: dir)
        if r.status != 0 {
            Issue.record("\(label): \(a) and \(b) differ: \(r.out)\(r.err)", sourceLocation: sourceLocation)
        }
    }

    /// Seeded guest operations: data writes with a pattern, zero writes and discards,
    /// unaligned offsets and lengths (mostly small, now and then a few MiB).
    fileprivate static func randomOps(_ rng: inout SeededRNG, size: UInt64, count: Int) -> [GuestOp] {
        (0..<count).map { _ in
            let off = UInt64.random(in: 0..<size, using: &rng)
            let maxLen: UInt64 = UInt64.random(in: 0..<5, using: &rng) == 0 ? 3 * mib : 300_000
            let len = min(size - off, UInt64.random(in: 1...maxLen, using: &rng))
            switch UInt64.random(in: 0..<4, using: &rng) {
            case 0: return GuestOp(command: "write -z \(off) \(len)", offset: off, length: len)
            case 1: return GuestOp(command: "discard \(off) \(len)", offset: off, length: len)
            default:
                let p = UInt64.random(in: 1...255, using: &rng)
                return GuestOp(command: "write -P \(p) \(off) \(len)", offset: off, length: len)
            }
        }
    }

    /// Target clusters (indices) a backup may copy after `ops`: every cluster that overlaps a
    /// bitmap granule the operations touched.
    fileprivate static func touchedClusters(_ ops: [GuestOp], granularity g: UInt64, cluster c: UInt64, size: UInt64) -> Set<UInt64> {
        var out = Set<UInt64>()
        for op in ops {
            let gs = op.offset / g * g
            let ge = min(size, (op.offset + op.length + g - 1) / g * g)
            for i in (gs / c)...((ge - 1) / c) { out.insert(i) }
        }
        return out
    }

    /// Target clusters (indices) overlapping the given [start, length] extents.
    static func clusters(of extents: [[UInt64]], cluster c: UInt64) -> Set<UInt64> {
        var out = Set<UInt64>()
        for e in extents where e[1] > 0 {
            for i in (e[0] / c)...((e[0] + e[1] - 1) / c) { out.insert(i) }
        }
        return out
    }

    fileprivate static func io(_ ops: [GuestOp], _ file: String, _ dir: String, withQEMU: Bool = false) throws {
        let args = ops.flatMap { ["-c", $0.command] } + [file]
        if withQEMU { try tool(["qemu-io", "-f", "qcow2"] + args, dir) } else { try qimg(["io"] + args, dir) }
    }

    /// The checks after one incremental backup round: content, allocation, consistency, bitmap.
    static func checkRound(_ label: String, dir: String, source: String, overlay: String, previous: String,
                           allImages: [String], allowed: Set<UInt64>, dirtyBefore: [[UInt64]], cluster: UInt64,
                           sourceLocation: SourceLocation = #_sourceLocation) throws {
        try expectIdentical(source, overlay, dir, label, sourceLocation: sourceLocation)
        #expect(try backingFile(overlay, dir) == previous, "\(label): backing file of \(overlay)", sourceLocation: sourceLocation)
        let top = try topLayer(overlay, dir)
        let held = clusters(of: top, cluster: cluster)
        let stray = held.subtracting(allowed).sorted()
        #expect(stray.isEmpty, "\(label): \(overlay) holds clusters no write of the round touched: \(stray.prefix(8).map { $0 * cluster })",
                sourceLocation: sourceLocation)
        // Exactly the clusters overlapping the dirty granules are copied (whole clusters;
        // a large granule copies all its clusters).
        let dirtyClusters = clusters(of: dirtyBefore, cluster: cluster)
        #expect(held == dirtyClusters,
                "\(label): \(overlay) holds \(held.count) clusters, the bitmap marked \(dirtyClusters.count); missing \(dirtyClusters.subtracting(held).sorted().prefix(8).map { $0 * cluster }), extra \(held.subtracting(dirtyClusters).sorted().prefix(8).map { $0 * cluster })",
                sourceLocation: sourceLocation)
        for image in allImages { try expectCheckClean(image, dir, label, sourceLocation: sourceLocation) }
        let after = try dump(source, "b", dir)
        #expect(after.dirty == 0 && after.extents.isEmpty, "\(label): bitmap not cleared: \(after.text)", sourceLocation: sourceLocation)
    }

    // MARK: 1. A chain of incremental backups

    /// Full backup with a bitmap, then rounds of seeded writes (qimg's, and once QEMU's),
    /// each followed by an incremental backup onto the previous one.
    @Test(.requiresQEMU) func incrementalChain() throws {
        let dir = try Self.scratch("chain")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size = 64 * Self.mib, cluster: UInt64 = 65536
        var rng = SeededRNG(state: 0xBAC0)
        try Self.qimg(["create", "-q", "-f", "qcow2", "src.qcow2", "64M"], dir)
        try Self.io(Self.randomOps(&rng, size: size, count: 20), "src.qcow2", dir)

        let full = try Qimg.run(["backup", "--sync=full", "--bitmap=b", "src.qcow2", "full.qcow2"], cwd: dir)
        #expect(full.status == 0, "\(full.summary): \(full.err)")
        #expect(full.out.hasPrefix("Backup complete"), "summary line: \(full.out)")
        try Self.expectIdentical("src.qcow2", "full.qcow2", dir, "full")
        #expect(try Self.backingFile("full.qcow2", dir) == nil, "a full backup has no backing file")
        #expect(try Self.dump("src.qcow2", "b", dir).dirty == 0, "full --bitmap creates a clean bitmap")
        try expectCheckClean("full.qcow2", dir, "full")

        var images = ["src.qcow2", "full.qcow2"]
        var previous = "full.qcow2"
        for round in 1...5 {
            let ops = Self.randomOps(&rng, size: size, count: 16)
            let byQEMU = round == 4
            try Self.io(ops, "src.qcow2", dir, withQEMU: byQEMU)
            let before = try Self.dump("src.qcow2", "b", dir)
            #expect(before.dirty > 0, "round \(round): the writes should have dirtied the bitmap")
            let overlay = "inc\(round).qcow2"
            let r = try Qimg.run(["backup", "--sync=\(round == 2 ? "dirty-bitmap" : "incremental")", "--bitmap=b",
                                  "-b", previous, "-F", "qcow2", "src.qcow2", overlay], cwd: dir)
            #expect(r.status == 0, "round \(round): \(r.summary): \(r.err)")
            guard r.status == 0 else { return }
            #expect(!Self.hasTemporary(dir, of: overlay), "round \(round): temporary file left behind")
            images.append(overlay)
            let allowed = Self.touchedClusters(ops, granularity: before.granularity, cluster: cluster, size: size)
            try Self.checkRound("round \(round)\(byQEMU ? " (qemu-io writes)" : "")", dir: dir, source: "src.qcow2",
                                overlay: overlay, previous: previous, allImages: images, allowed: allowed,
                                dirtyBefore: before.extents, cluster: cluster)
            previous = overlay
        }
        // The newest chain flattened byte for byte.
        try Self.tool(["qemu-img", "convert", "-O", "raw", previous, "chain.raw"], dir)
        try Self.tool(["qemu-img", "convert", "-O", "raw", "src.qcow2", "src.raw"], dir)
        #expect(try Self.bytes(dir, "chain.raw") == (try Self.bytes(dir, "src.raw")), "flattened chain differs from the source")
    }

    // MARK: 2. Granularity and cluster size variants

    struct Variant: Sendable, CustomTestStringConvertible {
        var granularity: String
        var granularityBytes: UInt64
        var cluster: String
        var clusterBytes: UInt64
        var testDescription: String { "granularity \(granularity), target clusters \(cluster)" }
    }

    static let variants: [Variant] = [
        Variant(granularity: "4k", granularityBytes: 4096, cluster: "64k", clusterBytes: 65536),
        Variant(granularity: "1M", granularityBytes: 1 << 20, cluster: "64k", clusterBytes: 65536),
        Variant(granularity: "64k", granularityBytes: 65536, cluster: "4k", clusterBytes: 4096),
        Variant(granularity: "64k", granularityBytes: 65536, cluster: "2M", clusterBytes: 2 << 20),
    ]

    @Test(.requiresQEMU, arguments: variants)
    func granularityAndClusterSize(_ v: Variant) throws {
        let dir = try Self.scratch("variant")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size = 48 * Self.mib
        var rng = SeededRNG(state: v.granularityBytes &* 31 &+ v.clusterBytes)
        try Self.qimg(["create", "-q", "-f", "qcow2", "src.qcow2", "48M"], dir)
        try Self.io(Self.randomOps(&rng, size: size, count: 12), "src.qcow2", dir)
        try Self.qimg(["bitmap", "--add", "-g", v.granularity, "src.qcow2", "b"], dir)
        try Self.qimg(["backup", "--sync=full", "--bitmap=b", "-o", "cluster_size=\(v.cluster)", "src.qcow2", "full.qcow2"], dir)
        try Self.expectIdentical("src.qcow2", "full.qcow2", dir, "full")
        #expect(try Self.dump("src.qcow2", "b", dir).granularity == v.granularityBytes, "full --bitmap keeps the existing bitmap")

        var images = ["src.qcow2", "full.qcow2"]
        var previous = "full.qcow2"
        for round in 1...3 {
            let ops = Self.randomOps(&rng, size: size, count: 10)
            try Self.io(ops, "src.qcow2", dir)
            let before = try Self.dump("src.qcow2", "b", dir)
            let overlay = "inc\(round).qcow2"
            try Self.qimg(["backup", "--sync=incremental", "--bitmap=b", "-o", "cluster_size=\(v.cluster)",
                           "-b", previous, "-F", "qcow2", "src.qcow2", overlay], dir)
            let info = try Self.tool(["qemu-img", "info", "--output=json", overlay], dir).out
            #expect(info.contains("\"cluster-size\": \(v.clusterBytes)"), "\(overlay) was not created with cluster_size=\(v.cluster)")
            images.append(overlay)
            let allowed = Self.touchedClusters(ops, granularity: v.granularityBytes, cluster: v.clusterBytes, size: size)
            try Self.checkRound("\(v.testDescription), round \(round)", dir: dir, source: "src.qcow2", overlay: overlay,
                                previous: previous, allImages: images, allowed: allowed, dirtyBefore: before.extents,
                                cluster: v.clusterBytes)
            previous = overlay
        }
    }

    // MARK: 3. Against QEMU's blockdev-backup

    /// Runs blockdev-backup in qemu-storage-daemon from `source` (node "src") into the
    /// existing qcow2 `target` (node "tgt"), waits for the job and quits.
    static func qemuBackup(_ dir: String, source: String, target: String, sync: String, bitmap: String?) throws {
        guard let qsd = Env.qemuStorageDaemon else { throw TestFailure("qemu-storage-daemon not found on PATH (install qemu-system-common)") }
        var sock = dir + "/qmp.sock"
        if sock.utf8.count > 100 { sock = "/tmp/qimg-qmp-\(UUID().uuidString.prefix(8)).sock" }
        defer { unlink(sock) }
        let d = try Spawned(qsd, [
            "--blockdev", "driver=file,node-name=sf,filename=\(source)",
            "--blockdev", "driver=qcow2,node-name=src,file=sf",
            "--blockdev", "driver=file,node-name=tf,filename=\(target)",
            "--blockdev", "driver=qcow2,node-name=tgt,file=tf",
            "--chardev", "socket,path=\(sock),server=on,wait=off,id=qmp0",
            "--monitor", "chardev=qmp0",
        ], cwd: dir)
        do {
            let qmp = try QMPClient(socketPath: sock, alive: { !d.wait(timeout: 0) })
            var args: [String: Any] = ["job-id": "j", "device": "src", "target": "tgt", "sync": sync]
            if let bitmap { args["bitmap"] = bitmap }
            try qmp.execute("blockdev-backup", args)
            let ev = try qmp.waitForEvent("BLOCK_JOB_COMPLETED")
            if let e = ev["error"] { throw TestFailure("QEMU's backup job failed: \(e)") }
            try qmp.execute("quit")
        } catch {
            d.send(SIGKILL)
            d.wait(timeout: Runner.backstopSeconds)
            throw TestFailure("qemu-storage-daemon backup (\(sync)): \(error); stderr: \(d.err)")
        }
        guard d.wait(timeout: Runner.backstopSeconds) else { throw TestFailure("qemu-storage-daemon did not exit after quit") }
        guard !d.signaled, d.status == 0 else { throw TestFailure("\(d.summary): \(d.err)") }
    }

    static let qemuVariants: [Variant] = [
        Variant(granularity: "64k", granularityBytes: 65536, cluster: "64k", clusterBytes: 65536),
        Variant(granularity: "4k", granularityBytes: 4096, cluster: "64k", clusterBytes: 65536),
        Variant(granularity: "1M", granularityBytes: 1 << 20, cluster: "64k", clusterBytes: 65536),
        Variant(granularity: "64k", granularityBytes: 65536, cluster: "2M", clusterBytes: 2 << 20),
    ]

    /// The same source and bitmap state backed up by qimg and by QEMU (on a copy): the
    /// overlays hold the same clusters and read the same.
    @Test(.requiresQEMU, .requiresStorageDaemon, arguments: qemuVariants)
    func incrementalMatchesQEMU(_ v: Variant) throws {
        guard Env.qemuStorageDaemon != nil else { throw TestFailure("qemu-storage-daemon not found on PATH (install qemu-system-common)") }
        let dir = try Self.scratch("qsd")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size = 48 * Self.mib
        var rng = SeededRNG(state: 0x0E5D &+ v.granularityBytes &+ v.clusterBytes)
        try Self.qimg(["create", "-q", "-f", "qcow2", "src.qcow2", "48M"], dir)
        try Self.io(Self.randomOps(&rng, size: size, count: 12), "src.qcow2", dir)
        try Self.qimg(["bitmap", "--add", "-g", v.granularity, "src.qcow2", "b"], dir)
        try Self.qimg(["backup", "--sync=full", "--bitmap=b", "-o", "cluster_size=\(v.cluster)", "src.qcow2", "full.qcow2"], dir)
        var previous = "full.qcow2"
        for round in 1...2 {
            let label = "\(v.testDescription), round \(round)"
            try Self.io(Self.randomOps(&rng, size: size, count: 12), "src.qcow2", dir, withQEMU: round == 2)
            // QEMU works on a copy of the same source + bitmap state.
            try? FileManager.default.removeItem(atPath: dir + "/src-q.qcow2")
            try FileManager.default.copyItem(atPath: dir + "/src.qcow2", toPath: dir + "/src-q.qcow2")
            let mine = "inc\(round).qcow2", theirs = "inc\(round)-q.qcow2"
            try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=\(v.cluster)",
                           "-b", previous, "-F", "qcow2", theirs, "48M"], dir)
            try Self.qemuBackup(dir, source: "src-q.qcow2", target: theirs, sync: "incremental", bitmap: "b")
            try Self.qimg(["backup", "--sync=incremental", "--bitmap=b", "-o", "cluster_size=\(v.cluster)",
                           "-b", previous, "-F", "qcow2", "src.qcow2", mine], dir)

            let ourMap = try Self.topLayer(mine, dir), theirMap = try Self.topLayer(theirs, dir)
            #expect(ourMap == theirMap, "\(label): allocated clusters differ\n    qimg: \(ourMap)\n    QEMU: \(theirMap)")
            try Self.expectIdentical(mine, theirs, dir, label)
            try Self.expectIdentical("src.qcow2", mine, dir, label)
            try Self.expectIdentical("src-q.qcow2", theirs, dir, label + " (QEMU's own result)")
            // Both cleared the bitmap; qimg reads QEMU's cleared bitmap.
            #expect(try Self.dump("src.qcow2", "b", dir).dirty == 0, "\(label): qimg left bits")
            #expect(try Self.dump("src-q.qcow2", "b", dir).dirty == 0, "\(label): QEMU left bits")
            for image in ["src.qcow2", "src-q.qcow2", mine, theirs] { try expectCheckClean(image, dir, label) }
            previous = mine
        }
    }

    /// sync=full and sync=top against QEMU's blockdev-backup of the same chain.
    @Test(.requiresQEMU, .requiresStorageDaemon) func fullAndTopMatchQEMU() throws {
        guard Env.qemuStorageDaemon != nil else { throw TestFailure("qemu-storage-daemon not found on PATH (install qemu-system-common)") }
        let dir = try Self.scratch("qsd-full")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeChainSource(dir)
        try Self.qimg(["backup", "--sync=full", "src.qcow2", "full.qcow2"], dir)
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "full-q.qcow2", "32M"], dir)
        try Self.qemuBackup(dir, source: "src.qcow2", target: "full-q.qcow2", sync: "full", bitmap: nil)
        try Self.expectIdentical("full.qcow2", "full-q.qcow2", dir, "sync=full")

        try Self.qimg(["backup", "--sync=top", "-b", "base.qcow2", "-F", "qcow2", "src.qcow2", "top.qcow2"], dir)
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top-q.qcow2", "32M"], dir)
        try Self.qemuBackup(dir, source: "src.qcow2", target: "top-q.qcow2", sync: "top", bitmap: nil)
        try Self.expectIdentical("top.qcow2", "top-q.qcow2", dir, "sync=top")
        let ours = try Self.topLayer("top.qcow2", dir), theirs = try Self.topLayer("top-q.qcow2", dir)
        #expect(ours == theirs, "sync=top: allocated clusters differ\n    qimg: \(ours)\n    QEMU: \(theirs)")
    }

    // MARK: 4. Failures keep the bitmap

    /// Builds src.qcow2 (`size`) with bitmap b and `dirty` bytes of data written after it.
    static func makeDirtySource(_ dir: String, size: String, dirtyMiB: UInt64) throws {
        try qimg(["create", "-q", "-f", "qcow2", "src.qcow2", size], dir)
        try qimg(["bitmap", "--add", "src.qcow2", "b"], dir)
        var cmds: [String] = []
        var off: UInt64 = 0
        var p = 0x10
        while off < dirtyMiB * mib {
            let n = min(32 * mib, dirtyMiB * mib - off)
            cmds += ["-c", "write -P \(p) \(off) \(n)"]
            off += n
            p += 1
        }
        try qimg(["io"] + cmds + ["src.qcow2"], dir)
    }

    /// The temporary files of runs writing `target` (TARGET.PID-TOKEN.qimg-tmp).
    static func temporaryFiles(_ dir: String, of target: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter {
            $0.hasPrefix(target + ".") && $0.hasSuffix(".qimg-tmp")
        }
    }

    static func hasTemporary(_ dir: String, of target: String) -> Bool { !temporaryFiles(dir, of: target).isEmpty }

    /// Starts qimg, waits until the temporary file of `target` exists (or qimg has ended:
    /// no deadline) and `extra` seconds more, then sends `sig`.
    static func interrupt(_ args: [String], _ dir: String, tmp target: String, extra: Double, signal sig: Int32) throws -> Spawned {
        let p = try Spawned(Qimg.path, args, cwd: dir)
        while !hasTemporary(dir, of: target) && !p.wait(timeout: 0.005) {}
        usleep(useconds_t(extra * 1e6))
        p.send(sig)
        guard p.wait(timeout: Runner.backstopSeconds) else { throw TestFailure("qimg did not stop after signal \(sig)") }
        return p
    }

    /// SIGKILL at random moments of a large copy: the bitmap and SOURCE are untouched, no
    /// TARGET appears; the next run removes the leftover temporary file and succeeds.
    @Test(.requiresQEMU) func sigkillMidCopyKeepsBitmap() throws {
        let dir = try Self.scratch("kill")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeDirtySource(dir, size: "256M", dirtyMiB: 208)
        let before = try Self.dump("src.qcow2", "b", dir)
        #expect(before.dirty == 208 * Self.mib)
        // At 256 MiB/s the copy takes at least ~0.8 s; every kill lands before 0.75 s from the
        // start, or 0.6 s after the temporary target appeared.
        let modes: [[String]] = [["--sync=incremental", "--no-backing"], ["--sync=full"], ["--sync=bitmap", "--bitmap-mode=on-success", "--no-backing"]]
        var rng = SeededRNG(state: 0x5EED)
        var leftovers = 0
        for attempt in 0..<10 {
            let args = ["backup"] + modes[attempt % modes.count] + ["--bitmap=b", "--speed=256M", "src.qcow2", "t.qcow2"]
            // Even attempts: a random moment after the start, with the previous attempt's
            // leftover still there. Odd attempts: a random moment after the copy began.
            let fromStart = attempt % 2 == 0
            if !fromStart { for t in Self.temporaryFiles(dir, of: "t.qcow2") { unlink(dir + "/" + t) } }
            let p = try Spawned(Qimg.path, args, cwd: dir)
            if !fromStart {
                while !Self.hasTemporary(dir, of: "t.qcow2") && !p.wait(timeout: 0.002) {}
            }
            usleep(useconds_t(UInt64.random(in: fromStart ? 20_000...750_000 : 0...600_000, using: &rng)))
            p.send(SIGKILL)
            guard p.wait(timeout: Runner.backstopSeconds) else { throw TestFailure("qimg did not die") }
            let label = "attempt \(attempt) (\(args.joined(separator: " ")))"
            #expect(p.signaled && p.status == SIGKILL, "\(label): finished before the kill: \(p.summary) \(p.err)")
            #expect(!Self.exists(dir, "t.qcow2"), "\(label): TARGET exists after SIGKILL")
            #expect(!Self.exists(dir, "t.qcow2.partial"), "\(label): a .partial appeared")
            if Self.hasTemporary(dir, of: "t.qcow2") { leftovers += 1 }
            let now = try Self.dump("src.qcow2", "b", dir)
            #expect(now.text == before.text, "\(label): bitmap changed:\n\(now.text)")
            try expectCheckClean("src.qcow2", dir, label)
        }
        #expect(leftovers >= 5, "only \(leftovers) of 10 kills landed mid-copy (the test is not testing much)")
        // The next run succeeds and removes the leftover.
        let r = try Qimg.run(["backup", "--sync=incremental", "--no-backing", "--bitmap=b", "src.qcow2", "t.qcow2"], cwd: dir)
        #expect(r.status == 0, "\(r.summary): \(r.err)")
        #expect(Self.exists(dir, "t.qcow2") && !Self.hasTemporary(dir, of: "t.qcow2"))
        try Self.expectIdentical("src.qcow2", "t.qcow2", dir, "after the kills")
        try expectCheckClean("t.qcow2", dir, "after the kills")
        #expect(try Self.dump("src.qcow2", "b", dir).dirty == 0)
    }

    /// SIGTERM/SIGINT mid-copy: exit 128+signal (143, 130), one message, no TARGET, no
    /// temporary file, bitmap unchanged.
    @Test(.requiresQEMU, arguments: [SIGTERM, SIGINT])
    func signalMidCopyExits128PlusSignal(_ sig: Int32) throws {
        let dir = try Self.scratch("term")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeDirtySource(dir, size: "64M", dirtyMiB: 40)
        let before = try Self.dump("src.qcow2", "b", dir)
        let p = try Self.interrupt(["backup", "--sync=incremental", "--no-backing", "--bitmap=b", "--speed=16M", "src.qcow2", "t.qcow2"],
                                   dir, tmp: "t.qcow2", extra: 0.5, signal: sig)
        #expect(!p.signaled && p.status == 128 + sig, "\(p.summary): \(p.err)")
        #expect(p.err.contains(sig == SIGTERM ? "SIGTERM" : "SIGINT"), "stderr: \(p.err)")
        #expect(p.stderrLines.count == 1 && p.err.hasPrefix("qimg: "), "stderr: \(p.err)")
        #expect(!Self.exists(dir, "t.qcow2") && !Self.hasTemporary(dir, of: "t.qcow2") && !Self.exists(dir, "t.qcow2.partial"))
        #expect(try Self.dump("src.qcow2", "b", dir).text == before.text, "bitmap changed")
        try expectCheckClean("src.qcow2", dir, "after signal \(sig)")
    }

    /// A tmpfs of `size` at DIR/small (root only); false, saying so, where mounting is not allowed.
    static func mountSmallTmpfs(_ dir: String, size: String, test: String, otherwise: String) throws -> Bool {
        try FileManager.default.createDirectory(atPath: dir + "/small", withIntermediateDirectories: true)
        if mount(["-t", "tmpfs", "-o", "size=\(size)", "tmpfs", "small"], dir) { return true }
        print("BackupTests.\(test)(tmpfs): cannot mount a tmpfs here; covered by '\(otherwise)'")
        return false
    }

    /// Tries to mount (root only); false when this environment does not allow it.
    static func mount(_ args: [String], _ dir: String) -> Bool {
        guard let exe = Env.which("mount"), let r = try? Runner.run(exe, args, cwd: dir, timeout: 20) else { return false }
        return r.status == 0
    }

    static func umount(_ path: String) {
        if let exe = Env.which("umount") { _ = try? Runner.run(exe, [path], cwd: "/", timeout: 20) }
    }

    /// A TARGET whose directory cannot be written: a missing directory, a path through a
    /// regular file, and (where mounting is allowed) a read-only bind mount. Tests run as
    /// root, so permission bits would not stop the write.
    @Test(.requiresQEMU, arguments: ["missing", "notdir", "readonly"])
    func unwritableTargetDirectory(_ kind: String) throws {
        let dir = try Self.scratch("rodir")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeDirtySource(dir, size: "32M", dirtyMiB: 8)
        let target: String
        switch kind {
        case "missing": target = "no/such/dir/t.qcow2"
        case "notdir":
            _ = FileManager.default.createFile(atPath: dir + "/file", contents: Data("x".utf8))
            target = "file/t.qcow2"
        default:
            try FileManager.default.createDirectory(atPath: dir + "/rw", withIntermediateDirectories: true)
            try FileManager.default.createDirectory(atPath: dir + "/ro", withIntermediateDirectories: true)
            guard Self.mount(["--bind", "rw", "ro"], dir) else {
                print("BackupTests.unwritableTargetDirectory(readonly): cannot bind-mount here; covered by 'missing' and 'notdir'")
                return
            }
            guard Self.mount(["-o", "remount,bind,ro", "ro"], dir) else {
                Self.umount(dir + "/ro")
                print("BackupTests.unwritableTargetDirectory(readonly): cannot remount read-only here")
                return
            }
            target = "ro/t.qcow2"
        }
        defer { if kind == "readonly" { Self.umount(dir + "/ro") } }
        let before = try Self.dump("src.qcow2", "b", dir)
        let src = try Self.bytes(dir, "src.qcow2")
        for args in [["--sync=incremental", "--no-backing"], ["--sync=full"]] {
            let r = try Qimg.run(["backup"] + args + ["--bitmap=b", "src.qcow2", target], cwd: dir)
            expectCleanFailure("\(kind): \(args)", r)
            #expect(!Self.exists(dir, target) && !Self.hasTemporary(dir, of: target), "\(kind): a target appeared")
            #expect(try Self.dump("src.qcow2", "b", dir).text == before.text, "\(kind): bitmap changed")
            #expect(try Self.bytes(dir, "src.qcow2") == src, "\(kind): SOURCE changed")
        }
        if kind == "readonly" {
            #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/rw").isEmpty)
        }
    }

    /// A disk that fills up mid-copy: a 4 MiB tmpfs (where mounting is allowed) or a file-size
    /// limit (RLIMIT_FSIZE, SIGXFSZ ignored, so writes fail with EFBIG).
    @Test(.requiresQEMU, arguments: ["tmpfs", "rlimit"])
    func diskFullKeepsBitmap(_ kind: String) throws {
        let dir = try Self.scratch("full")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeDirtySource(dir, size: "32M", dirtyMiB: 16)
        let before = try Self.dump("src.qcow2", "b", dir)
        let src = try Self.bytes(dir, "src.qcow2")
        let r: RunResult
        let target: String
        if kind == "tmpfs" {
            guard try Self.mountSmallTmpfs(dir, size: "4m", test: "diskFullKeepsBitmap", otherwise: "rlimit") else { return }
            target = "small/t.qcow2"
            defer { Self.umount(dir + "/small") }
            r = try Qimg.run(["backup", "--sync=incremental", "--no-backing", "--bitmap=b", "src.qcow2", target], cwd: dir)
            #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/small").isEmpty, "tmpfs not left empty")
        } else {
            target = "t.qcow2"
            // 2048 blocks: 1 or 2 MiB depending on the shell's block unit; the copy needs 16.
            r = try Runner.run("/bin/sh", ["-c", "ulimit -f 2048 && trap '' XFSZ && exec \"$0\" \"$@\"", Qimg.path,
                                           "backup", "--sync=incremental", "--no-backing", "--bitmap=b", "src.qcow2", target], cwd: dir)
        }
        expectCleanFailure(kind, r)
        #expect(!Self.exists(dir, target) && !Self.hasTemporary(dir, of: target), "\(kind): a target was left")
        #expect(try Self.dump("src.qcow2", "b", dir).text == before.text, "\(kind): bitmap changed")
        #expect(try Self.bytes(dir, "src.qcow2") == src, "\(kind): SOURCE changed")
        try expectCheckClean("src.qcow2", dir, kind)
    }

    // MARK: 5. Validation errors

    struct BadCall: Sendable, CustomTestStringConvertible {
        var name: String
        var args: [String]
        var source = "src.qcow2"
        var target = "t.qcow2"
        /// Text stderr must contain (the reason, not just any failure).
        var reason: String? = nil
        var testDescription: String { name }
    }

    /// Files the validation test makes before each call (the target may be one of them).
    static let preexisting: Set<String> = ["src.qcow2", "exists.qcow2", "small.qcow2", "inuse.qcow2", "mid.qcow2",
                                           "top.qcow2", "link.qcow2", "./src.qcow2", "adir"]

    static let badCalls: [BadCall] = [
        BadCall(name: "incremental without --bitmap", args: ["--sync=incremental", "--no-backing"]),
        BadCall(name: "sync=bitmap without --bitmap", args: ["--sync=bitmap", "--no-backing"]),
        BadCall(name: "missing bitmap", args: ["--sync=incremental", "--no-backing", "--bitmap=nope"]),
        BadCall(name: "in-use bitmap (incremental)", args: ["--sync=incremental", "--no-backing", "--bitmap=b"], source: "inuse.qcow2"),
        BadCall(name: "in-use bitmap (full)", args: ["--sync=full", "--bitmap=b"], source: "inuse.qcow2"),
        BadCall(name: "--bitmap with sync=top", args: ["--sync=top", "--bitmap=b"]),
        BadCall(name: "backing of another size", args: ["--sync=incremental", "--bitmap=b", "-b", "small.qcow2", "-F", "qcow2"]),
        BadCall(name: "missing backing", args: ["--sync=incremental", "--bitmap=b", "-b", "absent.qcow2", "-F", "qcow2"]),
        BadCall(name: "target exists", args: ["--sync=full"], target: "exists.qcow2"),
        BadCall(name: "target exists (incremental)", args: ["--sync=incremental", "--no-backing", "--bitmap=b"], target: "exists.qcow2"),
        BadCall(name: "bad sync", args: ["--sync=bogus", "--bitmap=b"]),
        BadCall(name: "bad bitmap-mode", args: ["--sync=bitmap", "--no-backing", "--bitmap=b", "--bitmap-mode=bogus"]),
        BadCall(name: "bitmap-mode with sync=incremental", args: ["--sync=incremental", "--no-backing", "--bitmap=b", "--bitmap-mode=never"]),
        // An incremental delta needs its backing file unless asked for explicitly.
        BadCall(name: "incremental without -b", args: ["--sync=incremental", "--bitmap=b"], reason: "needs -b"),
        BadCall(name: "sync=bitmap without -b", args: ["--sync=bitmap", "--bitmap=b"], reason: "needs -b"),
        BadCall(name: "--no-backing with -b", args: ["--sync=incremental", "--bitmap=b", "--no-backing", "-b", "exists.qcow2"], reason: "cannot be used together"),
        // --force never replaces a file the backup is made of, whatever the spelling.
        BadCall(name: "--force onto the source", args: ["--sync=full", "--bitmap=b", "--force"], target: "src.qcow2", reason: "is the image being backed up"),
        BadCall(name: "--force onto ./source", args: ["--sync=full", "--force"], target: "./src.qcow2", reason: "is the image being backed up"),
        BadCall(name: "--force onto a symlink to the source", args: ["--sync=full", "--force"], target: "link.qcow2", reason: "is the image being backed up"),
        BadCall(name: "--force onto the -b file", args: ["--sync=incremental", "--bitmap=b", "--force", "-b", "exists.qcow2", "-F", "qcow2"],
                target: "exists.qcow2", reason: "is the backup's backing file"),
        BadCall(name: "--force onto a file of -b's chain", args: ["--sync=incremental", "--bitmap=b", "--force", "-b", "mid.qcow2", "-F", "qcow2"],
                target: "exists.qcow2", reason: "in the backing chain of the backup's backing file"),
        BadCall(name: "--force onto a file of the source's chain", args: ["--sync=full", "--force"], source: "top.qcow2",
                target: "exists.qcow2", reason: "in the backing chain of the image being backed up"),
        BadCall(name: "directory target", args: ["--sync=full"], target: "adir", reason: "adir: is a directory"),
        BadCall(name: "directory target (--force)", args: ["--sync=full", "--force"], target: "adir", reason: "adir: is a directory"),
    ]

    @Test(.requiresQEMU, arguments: badCalls)
    func validationErrorsChangeNothing(_ c: BadCall) throws {
        let dir = try Self.scratch("bad")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.qimg(["create", "-q", "-f", "qcow2", "src.qcow2", "16M"], dir)
        try Self.qimg(["bitmap", "--add", "src.qcow2", "b"], dir)
        try Self.qimg(["io", "-c", "write -P 9 100k 300k", "-c", "write -z 2M 64k", "src.qcow2"], dir)
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "small.qcow2", "8M"], dir)
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "exists.qcow2", "16M"], dir)
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "inuse.qcow2", "16M"], dir)
        try Self.tool(["qemu-img", "bitmap", "--add", "inuse.qcow2", "b"], dir)
        _ = try Runner.qemuIO(["-c", "write 0 4k", "-c", "abort", "inuse.qcow2"], cwd: dir)
        #expect(try Self.tool(["qemu-img", "info", "inuse.qcow2"], dir).out.contains("in-use"))
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "exists.qcow2", "-F", "qcow2", "mid.qcow2"], dir)
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "exists.qcow2", "-F", "qcow2", "top.qcow2"], dir)
        #expect(symlink("src.qcow2", dir + "/link.qcow2") == 0)
        try FileManager.default.createDirectory(atPath: dir + "/adir", withIntermediateDirectories: false)

        let watched = [c.source, "src.qcow2", "exists.qcow2", "small.qcow2", "mid.qcow2", "top.qcow2"]
        let before = try watched.map { try Self.bytes(dir, $0) }
        let r = try Qimg.run(["backup"] + c.args + [c.source, c.target], cwd: dir)
        expectCleanFailure(c.name, r)
        if let reason = c.reason { #expect(r.err.contains(reason), "\(c.name): stderr: \(r.err)") }
        for (name, data) in zip(watched, before) {
            #expect(try Self.bytes(dir, name) == data, "\(c.name): \(name) changed")
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/adir").isEmpty, "\(c.name): adir changed")
        if !Self.preexisting.contains(c.target) { #expect(!Self.exists(dir, c.target), "\(c.name): TARGET created") }
        #expect(!Self.hasTemporary(dir, of: c.target) && !Self.exists(dir, c.target + ".partial"), "\(c.name): leftovers")
    }

    // MARK: 6. bitmap-mode

    @Test(.requiresQEMU) func bitmapModeNeverAndOnSuccess() throws {
        let dir = try Self.scratch("mode")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var rng = SeededRNG(state: 0x30DE)
        let size = 32 * Self.mib
        try Self.qimg(["create", "-q", "-f", "qcow2", "src.qcow2", "32M"], dir)
        try Self.io(Self.randomOps(&rng, size: size, count: 10), "src.qcow2", dir)
        try Self.qimg(["backup", "--sync=full", "--bitmap=b", "src.qcow2", "full.qcow2"], dir)
        try Self.io(Self.randomOps(&rng, size: size, count: 10), "src.qcow2", dir)
        let d0 = try Self.dump("src.qcow2", "b", dir)
        #expect(d0.dirty > 0)

        try Self.qimg(["backup", "--sync=bitmap", "--bitmap=b", "--bitmap-mode=never", "-b", "full.qcow2", "-F", "qcow2", "src.qcow2", "never.qcow2"], dir)
        try Self.expectIdentical("src.qcow2", "never.qcow2", dir, "never")
        #expect(try Self.dump("src.qcow2", "b", dir).text == d0.text, "bitmap-mode=never changed the bitmap")

        try Self.qimg(["backup", "--sync=bitmap", "--bitmap=b", "--bitmap-mode=on-success", "-b", "full.qcow2", "-F", "qcow2", "src.qcow2", "ok.qcow2"], dir)
        try Self.expectIdentical("src.qcow2", "ok.qcow2", dir, "on-success")
        #expect(try Self.dump("src.qcow2", "b", dir).dirty == 0, "bitmap-mode=on-success left bits")
        #expect(try Self.topLayer("ok.qcow2", dir) == (try Self.topLayer("never.qcow2", dir)), "never and on-success copied different clusters")

        try Self.io(Self.randomOps(&rng, size: size, count: 6), "src.qcow2", dir)
        try Self.qimg(["backup", "--sync=bitmap", "--bitmap=b", "--bitmap-mode=always", "-b", "ok.qcow2", "-F", "qcow2", "src.qcow2", "always.qcow2"], dir)
        try Self.expectIdentical("src.qcow2", "always.qcow2", dir, "always (success)")
        #expect(try Self.dump("src.qcow2", "b", dir).dirty == 0, "bitmap-mode=always (success) left bits")
        #expect(!Self.exists(dir, "always.qcow2.partial"))
        for f in ["src.qcow2", "full.qcow2", "never.qcow2", "ok.qcow2", "always.qcow2"] { try expectCheckClean(f, dir, "modes") }

        // --force replaces an existing TARGET.
        try Self.qimg(["backup", "--sync=full", "--force", "src.qcow2", "never.qcow2"], dir)
        try Self.expectIdentical("src.qcow2", "never.qcow2", dir, "--force")
        #expect(try Self.backingFile("never.qcow2", dir) == nil, "--force: the replaced TARGET is the new full backup")
    }

    /// bitmap-mode=always interrupted: TARGET.partial is kept (consistent), the bitmap keeps only
    /// the granules not copied into it, and the next backup on top of the partial completes the chain.
    @Test(.requiresQEMU) func bitmapModeAlwaysKeepsPartial() throws {
        let dir = try Self.scratch("always")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeDirtySource(dir, size: "64M", dirtyMiB: 8)
        try Self.qimg(["backup", "--sync=full", "--bitmap=b", "src.qcow2", "full.qcow2"], dir)
        // 40 MiB dirty: data, zeros over data, a discard.
        try Self.qimg(["io", "-c", "write -P 0x61 4M 36M", "-c", "write -z 1M 3M", "-c", "discard 40M 2M", "src.qcow2"], dir)
        let d0 = try Self.dump("src.qcow2", "b", dir)
        let p = try Self.interrupt(["backup", "--sync=bitmap", "--bitmap=b", "--bitmap-mode=always", "--speed=16M",
                                    "-b", "full.qcow2", "-F", "qcow2", "src.qcow2", "t.qcow2"],
                                   dir, tmp: "t.qcow2", extra: 0.6, signal: SIGTERM)
        #expect(!p.signaled && p.status == 143, "\(p.summary): \(p.err)")
        #expect(p.stderrLines.count == 1 && p.err.hasPrefix("qimg: "), "stderr: \(p.err)")
        // The message says where the partial backup is and how to use it.
        #expect(p.err.contains("interrupted by SIGTERM") && p.err.contains("kept in t.qcow2.partial")
                && p.err.contains("backing file of the next backup"), "stderr: \(p.err)")
        #expect(!Self.exists(dir, "t.qcow2") && !Self.hasTemporary(dir, of: "t.qcow2"))
        guard Self.exists(dir, "t.qcow2.partial") else {
            Issue.record("bitmap-mode=always: no t.qcow2.partial after SIGTERM")
            return
        }
        try expectCheckClean("t.qcow2.partial", dir, "partial")
        try expectCheckClean("src.qcow2", dir, "partial")
        #expect(try Self.backingFile("t.qcow2.partial", dir) == "full.qcow2")
        let copied = try Self.topLayer("t.qcow2.partial", dir)
        #expect(!copied.isEmpty, "nothing was copied before SIGTERM")

        // Expected: the granules of d0 not wholly inside the partial's top layer.
        let g = d0.granularity, size = 64 * Self.mib
        func covered(_ a: UInt64, _ b: UInt64) -> Bool { copied.contains { $0[0] <= a && b <= $0[0] + $0[1] } }
        var expected: [[UInt64]] = []
        for e in d0.extents {
            var a = e[0]
            while a < e[0] + e[1] {
                let b = min(a + g, size)
                if !covered(a, b) {
                    if let last = expected.last, last[0] + last[1] == a { expected[expected.count - 1][1] += b - a } else { expected.append([a, b - a]) }
                }
                a = b
            }
        }
        let d1 = try Self.dump("src.qcow2", "b", dir)
        #expect(d1.extents == expected, "bitmap after the partial backup:\n    got      \(d1.extents)\n    expected \(expected)")
        #expect(d1.dirty > 0 && d1.dirty < d0.dirty, "the partial should cover part of the dirty data (\(d1.dirty) of \(d0.dirty))")

        // The partial's clusters hold the source's data; the rest follows in the next backup.
        try Self.tool(["qemu-img", "convert", "-O", "raw", "src.qcow2", "src.raw"], dir)
        try Self.tool(["qemu-img", "convert", "-O", "raw", "t.qcow2.partial", "partial.raw"], dir)
        let s = try Self.bytes(dir, "src.raw"), t = try Self.bytes(dir, "partial.raw")
        for e in copied {
            let r = Int(e[0])..<Int(e[0] + e[1])
            #expect(s[r] == t[r], "partial data differs from the source in \(e)")
        }
        try Self.qimg(["backup", "--sync=bitmap", "--bitmap=b", "-b", "t.qcow2.partial", "-F", "qcow2", "src.qcow2", "t2.qcow2"], dir)
        try Self.expectIdentical("src.qcow2", "t2.qcow2", dir, "chain full <- partial <- next")
        #expect(try Self.dump("src.qcow2", "b", dir).dirty == 0)
        let t2 = try Self.topLayer("t2.qcow2", dir)
        #expect(Self.clusters(of: t2, cluster: 65536) == Self.clusters(of: d1.extents, cluster: 65536),
                "the next backup should copy exactly the remaining bits")
    }

    /// bitmap-mode=always on a full disk: the kept partial checks clean with qemu-img (no
    /// leaked clusters: the failed copy had raised refcounts for clusters it never linked),
    /// the message says where it is and how to use it, and the next backup on top of it
    /// completes the chain. The disk fills up in a 12 MiB tmpfs (where mounting is allowed),
    /// or by fault injection (ENOSPC on the 20th write to the target, part of it written).
    @Test(.requiresQEMU, arguments: ["enospc", "tmpfs"])
    func bitmapModeAlwaysOnFullDiskKeepsCleanPartial(_ kind: String) throws {
        let dir = try Self.scratch("always-full")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeDirtySource(dir, size: "64M", dirtyMiB: 4)
        var t = "t.qcow2"
        if kind == "tmpfs" {
            guard try Self.mountSmallTmpfs(dir, size: "12m", test: "bitmapModeAlwaysOnFullDiskKeepsCleanPartial", otherwise: "enospc") else { return }
            t = "small/t.qcow2"
        }
        defer { if kind == "tmpfs" { Self.umount(dir + "/small") } }
        try Self.qimg(["backup", "--sync=full", "--bitmap=b", "src.qcow2", "full.qcow2"], dir)
        try Self.qimg(["io", "-c", "write -P 0x62 8M 24M", "src.qcow2"], dir)
        let d0 = try Self.dump("src.qcow2", "b", dir)
        let backing = kind == "tmpfs" ? "../full.qcow2" : "full.qcow2"
        let env = kind == "tmpfs" ? [] : ["QIMG_FAULTS=write:20:ENOSPC:partial,prefix:t.qcow2."]
        let r = try Runner.run("/usr/bin/env", env + [Qimg.path, "backup", "--sync=bitmap", "--bitmap=b", "--bitmap-mode=always",
                                                      "-b", backing, "-F", "qcow2", "src.qcow2", t], cwd: dir)
        expectCleanFailure("always on a full disk (\(kind))", r)
        #expect(r.err.contains("No space left on device") && r.err.contains("kept in \(t).partial")
                && r.err.contains("backing file of the next backup"), "stderr: \(r.err)")
        #expect(!Self.exists(dir, t) && !Self.hasTemporary(dir, of: t))
        try expectCheckClean(t + ".partial", dir, "the partial")
        try expectCheckClean("src.qcow2", dir, "always on a full disk")
        let d1 = try Self.dump("src.qcow2", "b", dir)
        #expect(d1.dirty > 0 && d1.dirty < d0.dirty, "the partial should hold part of the dirty data (\(d1.dirty) of \(d0.dirty))")
        try Self.qimg(["backup", "--sync=bitmap", "--bitmap=b", "-b", t + ".partial", "-F", "qcow2", "src.qcow2", "t2.qcow2"], dir)
        try Self.expectIdentical("src.qcow2", "t2.qcow2", dir, "chain full <- partial <- next")
        #expect(try Self.dump("src.qcow2", "b", dir).dirty == 0)
    }

    // MARK: 7. sync=full and sync=top against qemu-img convert

    /// base.qcow2 (data) <- src.qcow2 (new data, zeros and a discard over base data).
    static func makeChainSource(_ dir: String) throws {
        try qimg(["create", "-q", "-f", "qcow2", "base.qcow2", "32M"], dir)
        try qimg(["io", "-c", "write -P 0x11 0 6M", "-c", "write -P 0x12 10M 3M", "-c", "write -P 0x13 30M 1234567", "base.qcow2"], dir)
        try qimg(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "src.qcow2"], dir)
        try qimg(["io", "-c", "write -P 0x21 1M 100k", "-c", "write -z 2M 1M", "-c", "discard 10M 1M",
                  "-c", "write -P 0x22 20M 3000", "-c", "write -z 4000 5000", "-c", "write -P 0 12M 64k", "src.qcow2"], dir)
    }

    /// A full backup is convert's copy (one code path, the same zero detection, sparseness,
    /// compression and padding): from the same source, the two files are byte for byte the
    /// same, compressed or not.
    @Test(.requiresQEMU, arguments: [false, true])
    func fullBackupIsConvertsCopy(compressed: Bool) throws {
        let dir = try Self.scratch("fullisconvert")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeChainSource(dir)
        let c = compressed ? ["-c"] : []
        try Self.qimg(["backup", "--sync=full"] + c + ["src.qcow2", "full.qcow2"], dir)
        try Self.qimg(["convert", "-O", "qcow2"] + c + ["src.qcow2", "conv.qcow2"], dir)
        let full = try Self.bytes(dir, "full.qcow2"), conv = try Self.bytes(dir, "conv.qcow2")
        #expect(full.count == conv.count, "sizes: backup \(full.count), convert \(conv.count)")
        #expect(full == conv, "backup --sync=full \(c) and convert \(c) wrote different files")
        try expectCheckClean("full.qcow2", dir, "full backup (compressed: \(compressed))")
        try Self.expectIdentical("src.qcow2", "full.qcow2", dir, "full backup (compressed: \(compressed))")
    }

    @Test(.requiresQEMU) func fullAndTopMatchConvert() throws {
        let dir = try Self.scratch("convert")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeChainSource(dir)

        try Self.qimg(["backup", "--sync=full", "src.qcow2", "full.qcow2"], dir)
        try Self.tool(["qemu-img", "convert", "-O", "qcow2", "src.qcow2", "ref-full.qcow2"], dir)
        try Self.expectIdentical("full.qcow2", "ref-full.qcow2", dir, "sync=full vs convert")
        try Self.expectIdentical("src.qcow2", "full.qcow2", dir, "sync=full vs source")
        #expect(try Self.backingFile("full.qcow2", dir) == nil, "sync=full must flatten the chain")
        #expect(try Self.dataRanges("full.qcow2", dir) == (try Self.dataRanges("ref-full.qcow2", dir)),
                "sync=full: data ranges differ from qemu-img convert's (zeros should stay sparse)")
        try expectCheckClean("full.qcow2", dir, "full")

        try Self.qimg(["backup", "--sync=top", "-b", "base.qcow2", "-F", "qcow2", "src.qcow2", "top.qcow2"], dir)
        try Self.tool(["qemu-img", "convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "src.qcow2", "ref-top.qcow2"], dir)
        try Self.expectIdentical("top.qcow2", "ref-top.qcow2", dir, "sync=top vs convert -B")
        try Self.expectIdentical("src.qcow2", "top.qcow2", dir, "sync=top vs source")
        #expect(try Self.backingFile("top.qcow2", dir) == "base.qcow2")
        let srcTop = Self.clusters(of: try Self.topLayer("src.qcow2", dir), cluster: 65536)
        let held = Self.clusters(of: try Self.topLayer("top.qcow2", dir), cluster: 65536)
        #expect(held.isSubset(of: srcTop), "sync=top copied clusters the top layer does not hold: \(held.subtracting(srcTop).sorted().map { $0 * 65536 })")
        try expectCheckClean("top.qcow2", dir, "top")
        // A standalone restore of the top backup, as a user would do it.
        try Self.tool(["qemu-img", "convert", "-O", "raw", "top.qcow2", "top.raw"], dir)
        try Self.tool(["qemu-img", "convert", "-O", "raw", "src.qcow2", "src.raw"], dir)
        #expect(try Self.bytes(dir, "top.raw") == (try Self.bytes(dir, "src.raw")))
    }
}
