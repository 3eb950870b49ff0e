import Foundation
import QCow2
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// `qimg backup --nbd URI`: backups pulled from real NBD servers — qemu-nbd exporting an
/// offline image with its bitmap (`-B`), and qemu-storage-daemon running the disk (guest
/// writes through a writable export) with a point-in-time view exported read-only with
/// its bitmap (blockdev-backup sync=none into an overlay). Every point is checked with
/// QEMU's tools: `qemu-img compare` against the disk as it was, `qemu-img map` for holes,
/// `qemu-img check`. Servers are started per test and killed at its end.

/// A qemu-nbd serving one image read-only (`-t`: it outlives its clients) on a unix
/// socket, or on 127.0.0.1:`tcp.port` with `tcp.extra` arguments (TLS), with bitmap
/// `bitmap` when given; killed when released.
private final class NBDExport {
    let process: Spawned
    let socket: String
    let port: UInt16?
    let name = "disk"
    var uri: String { port.map { "nbd://127.0.0.1:\($0)/\(name)" } ?? "nbd+unix:///\(name)?socket=\(socket)" }

    /// `image`: a qcow2 file, or (`imageOptions`) qemu-nbd's --image-opts string.
    init(_ image: String, dir: String, bitmap: String?, format: String = "qcow2", imageOptions: Bool = false,
         tcp: (port: UInt16, extra: [String])? = nil) throws {
        guard let qemuNBD = Env.qemuNBD else { throw TestFailure("qemu-nbd not found on PATH (install qemu-utils)") }
        socket = dir + "/nbd.sock"
        port = tcp?.port
        unlink(socket)
        let how = imageOptions ? ["--image-opts"] : ["-f", format]
        let listen = tcp.map { ["-b", "127.0.0.1", "-p", "\($0.port)"] + $0.extra } ?? ["-k", socket]
        let args = ["-r", "-t"] + how + listen + ["-x", name] + (bitmap.map { ["-B", $0] } ?? []) + [image]
        process = try Spawned(qemuNBD, args, cwd: dir)
        let p = process
        if let port { try LoopbackTCP.waitForListener(port, alive: { p.isRunning }) } else {
            close(try connectUnixSocket(socket, alive: { p.isRunning }))
        }
    }

    func kill() {
        process.send(SIGKILL)
        process.wait(timeout: Runner.backstopSeconds)
    }

    deinit { kill() }
}

/// A qemu-storage-daemon running disk0 (the "VM"): a QMP monitor, an NBD server with a
/// writable export `exp0` the guest writes through (qemu-io over NBD, recorded in the
/// node's bitmaps), and point-in-time views exported read-only (section 5b of the live
/// backup notes): an overlay backed by disk0 filled by a blockdev-backup sync=none job.
private final class LiveDisk {
    let daemon: Spawned
    let qmp: QMPClient
    let dir: String
    let nbdSocket: String

    init(_ image: String, dir: String) throws {
        guard let qsd = Env.qemuStorageDaemon else { throw TestFailure("qemu-storage-daemon not found on PATH (install qemu-system-common)") }
        self.dir = dir
        nbdSocket = dir + "/nbd.sock"
        let qmpSocket = dir + "/qmp.sock"
        daemon = try Spawned(qsd, [
            "--blockdev", "driver=file,node-name=file0,filename=\(image)",
            "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
            "--chardev", "socket,path=\(qmpSocket),server=on,wait=off,id=qmp0", "--monitor", "chardev=qmp0",
            "--nbd-server", "addr.type=unix,addr.path=\(nbdSocket)",
        ], cwd: dir)
        let d = daemon
        do {
            qmp = try QMPClient(socketPath: qmpSocket, alive: { d.isRunning })
            try qmp.execute("block-export-add", ["type": "nbd", "id": "exp0", "node-name": "disk0", "name": "exp0", "writable": true])
        } catch {
            d.send(SIGKILL)
            d.wait(timeout: Runner.backstopSeconds)
            throw TestFailure("qemu-storage-daemon: \(error); stderr: \(d.err)")
        }
    }

    func stop() {
        daemon.send(SIGKILL)
        daemon.wait(timeout: Runner.backstopSeconds)
    }

    deinit { stop() }

    func uri(_ export: String) -> String { "nbd+unix:///\(export)?socket=\(nbdSocket)" }

    /// Guest writes: qemu-io commands on the running disk.
    func write(_ commands: [String]) throws {
        try Runner.qemuStep(["qemu-io", "-f", "raw", uri("exp0")] + commands.flatMap { ["-c", $0] }, in: dir)
    }

    /// The disk as it is now, copied by qemu-img into `name` (qcow2).
    func snapshot(_ name: String) throws {
        try Runner.qemuStep(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri("exp0"), name], in: dir)
    }

    /// Starts view `n`: in one transaction, bitmap `newBitmap` starts recording (the next
    /// incremental's), `oldBitmap` (if any) stops, and the view freezes the disk; the view
    /// is exported read-only as `snapN` with `oldBitmap`.
    func startView(_ n: Int, newBitmap: String, oldBitmap: String?) throws {
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "fleece\(n).qcow2", "32M"], in: dir)
        try qmp.execute("blockdev-add", ["driver": "qcow2", "node-name": "fl\(n)",
                                         "file": ["driver": "file", "filename": dir + "/fleece\(n).qcow2"], "backing": "disk0"])
        var actions: [[String: Any]] = [["type": "block-dirty-bitmap-add", "data": ["node": "disk0", "name": newBitmap, "persistent": true]]]
        if let old = oldBitmap { actions.append(["type": "block-dirty-bitmap-disable", "data": ["node": "disk0", "name": old]]) }
        actions.append(["type": "blockdev-backup", "data": ["job-id": "view\(n)", "device": "disk0", "target": "fl\(n)", "sync": "none"]])
        try qmp.execute("transaction", ["actions": actions])
        var export: [String: Any] = ["type": "nbd", "id": "fx\(n)", "node-name": "fl\(n)", "name": "snap\(n)", "writable": false]
        if let old = oldBitmap { export["bitmaps"] = [old] }
        try qmp.execute("block-export-add", export)
    }

    /// Ends view `n` and removes the bitmap it exported (its changes are in a durable backup).
    func endView(_ n: Int, oldBitmap: String?) throws {
        try qmp.execute("block-export-del", ["id": "fx\(n)"])
        _ = try qmp.waitForEvent("BLOCK_EXPORT_DELETED")
        try qmp.execute("block-job-cancel", ["device": "view\(n)"])
        _ = try qmp.waitForEvent("BLOCK_JOB_CANCELLED")
        try qmp.execute("blockdev-del", ["node-name": "fl\(n)"])
        if let old = oldBitmap { try qmp.execute("block-dirty-bitmap-remove", ["node": "disk0", "name": old]) }
    }
}

@Suite struct NBDPullTests {
    static let mib: UInt64 = 1 << 20

    static func scratch(_ name: String) throws -> String { try Paths.newScratch("nbd-\(name)") }

    @discardableResult
    static func qimg(_ args: [String], _ dir: String) throws -> RunResult {
        let r = try Qimg.run(args, cwd: dir)
        guard r.status == 0, !r.signaled else { throw TestFailure("\(r.summary): \(r.err)") }
        return r
    }

    static func tool(_ args: [String], _ dir: String) throws { try Runner.qemuStep(args, in: dir) }

    static func expectIdentical(_ a: String, _ b: String, _ dir: String, _ label: String) throws {
        let r = try Runner.qemuImg(["compare", "-U", a, b], cwd: dir)
        #expect(r.status == 0, "\(label): \(a) and \(b) differ: \(r.out)\(r.err)")
    }

    /// The guest ranges `image` (its top layer when `top`) maps as data, from `qemu-img map`.
    static func dataRanges(_ image: String, _ dir: String, top: Bool = false) throws -> [(UInt64, UInt64)] {
        let r = try Runner.qemuImg(["map", "-U", "--output=json", image], cwd: dir)
        guard r.status == 0, let list = try JSONSerialization.jsonObject(with: r.stdout) as? [[String: Any]] else {
            throw TestFailure("qemu-img map \(image): \(r.err)")
        }
        return list.compactMap { e in
            guard e["data"] as? Bool == true, !top || (e["depth"] as? Int) == 0,
                  let s = e["start"] as? Int, let n = e["length"] as? Int else { return nil }
            return (UInt64(s), UInt64(n))
        }
    }

    static func covered(_ a: UInt64, _ n: UInt64, by ranges: [(UInt64, UInt64)]) -> Bool {
        var pos = a
        for (s, len) in ranges.sorted(by: { $0.0 < $1.0 }) where s <= pos && pos < s + len { pos = s + len }
        return pos >= a + n
    }

    /// Holes stay holes: everything `backup` holds as data is data in `source` too, rounded
    /// to the backup's clusters.
    static func expectHolesKept(_ backup: String, source: String, cluster: UInt64, _ dir: String, _ label: String) throws {
        let src = try dataRanges(source, dir).map { ($0.0 / cluster * cluster, ($0.0 + $0.1 + cluster - 1) / cluster * cluster - $0.0 / cluster * cluster) }
        for (s, n) in try dataRanges(backup, dir) {
            #expect(covered(s, n, by: src), "\(label): \(backup) holds data at \(s)+\(n), a hole in \(source)")
        }
    }

    static let clusterSizes: [UInt64] = [4096, 65536, 2 << 20]

    // MARK: qemu-nbd -B: an offline image and its bitmap

    /// A full backup, then two incrementals, each pulled from qemu-nbd exporting the image
    /// with its 64 KiB bitmap, into targets of 4 KiB, 64 KiB and 2 MiB clusters; every point
    /// restores byte-identical, holes stay holes, a cluster zeroed since the last backup
    /// reads as zeros through the chain and only the dirty clusters are in each overlay.
    @Test(.requiresQEMU, arguments: clusterSizes)
    func offlineExportWithBitmap(_ cluster: UInt64) throws {
        let dir = try Self.scratch("offline")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "32M"], dir)
        try Self.tool(["qemu-io", "-f", "qcow2", "src.qcow2", "-c", "write -P 0x11 0 3M", "-c", "write -P 0x12 5M 200k",
                       "-c", "write -z 6M 1M", "-c", "write -P 0x13 9M 64k"], dir)
        try Self.tool(["qemu-img", "bitmap", "--add", "-g", "64k", "src.qcow2", "b0"], dir)
        let o = ["-o", "cluster_size=\(cluster)"]
        do {
            let e = try NBDExport(dir + "/src.qcow2", dir: dir, bitmap: nil)
            defer { e.kill() }
            try Self.qimg(["backup", "--nbd", e.uri, "--sync=full"] + o + ["full.qcow2"], dir)
        }
        try Self.expectIdentical("src.qcow2", "full.qcow2", dir, "full")
        try Self.expectHolesKept("full.qcow2", source: "src.qcow2", cluster: cluster, dir, "full")
        #expect(try !Self.dataRanges("full.qcow2", dir).contains { $0.0 + $0.1 > 9 * Self.mib + 64 * 1024 + cluster },
                "full: data past the last written range")
        try expectCheckClean("full.qcow2", dir, "full")

        let rounds = [
            ["write -P 0x21 64k 4k", "write -z 1M 128k", "write -P 0x22 20M 1M", "write -P 0x23 31M 1M"],
            ["write -z 20M 256k", "write -P 0x31 2M 8k", "write -z 0 64k", "write -P 0x32 12M 3M"],
        ]
        var previous = "full.qcow2"
        for (i, ops) in rounds.enumerated() {
            let label = "cluster \(cluster), incremental \(i + 1)"
            try Self.tool(["qemu-io", "-f", "qcow2", "src.qcow2"] + ops.flatMap { ["-c", $0] }, dir)
            let target = "inc\(i + 1).qcow2"
            do {
                let e = try NBDExport(dir + "/src.qcow2", dir: dir, bitmap: "b0")
                defer { e.kill() }
                try Self.qimg(["backup", "--nbd", e.uri, "--sync=incremental", "--bitmap", "b0", "-b", previous, "-F", "qcow2"] + o + [target], dir)
            }
            try Self.expectIdentical("src.qcow2", target, dir, label)
            try expectCheckClean(target, dir, label)
            // Zeroed since the previous point: zeros through the chain, over older data.
            let zeroed = i == 0 ? "read -P 0 1M 128k" : "read -P 0 0 64k"
            let r = try Runner.qemuIO(["-r", "-f", "qcow2", target, "-c", zeroed], cwd: dir)
            #expect(r.status == 0 && !r.out.contains("Pattern verification failed"), "\(label): \(r.out)\(r.err)")
            // The overlay holds only clusters the bitmap marks (what qemu-img bitmap saw).
            let top = try Self.dataRanges(target, dir, top: true)
            let dirty = ops.compactMap { Self.range(of: $0) }.map { ($0.0 / cluster * cluster, ($0.0 + $0.1 + cluster - 1) / cluster * cluster - $0.0 / cluster * cluster) }
            for (s, n) in top { #expect(Self.covered(s, n, by: dirty), "\(label): \(target) holds \(s)+\(n), never written") }
            // Clear the bitmap: the server's owner does it once the backup is durable.
            try Self.tool(["qemu-img", "bitmap", "--clear", "src.qcow2", "b0"], dir)
            previous = target
        }
    }

    /// The (offset, length) of a qemu-io write command ("write [-P N|-z] OFFSET LENGTH"),
    /// widened to the bitmap's 64 KiB.
    static func range(of op: String) -> (UInt64, UInt64)? {
        let words = op.split(separator: " ")
        guard words.count >= 3, let a = size(words[words.count - 2]), let n = size(words[words.count - 1]) else { return nil }
        let g: UInt64 = 65536
        return (a / g * g, (a + n + g - 1) / g * g - a / g * g)
    }

    static func size(_ s: Substring) -> UInt64? {
        let units: [Character: UInt64] = ["k": 1024, "M": 1 << 20]
        if let u = s.last.flatMap({ units[$0] }) { return UInt64(s.dropLast()).map { $0 * u } }
        return UInt64(s)
    }

    // MARK: The library's NBD source against qemu-img's view of the same image

    /// `NBDSource` over qemu-nbd: the ranges it reports as data are the ones `qemu-img map`
    /// reports as data (zero clusters and unallocated ranges are not), `extent(at:)` agrees
    /// with the walk, and reads return what qemu-io wrote, across requests larger than
    /// one chunk.
    @Test(.requiresQEMU) func sourceMatchesQEMUMap() throws {
        let dir = try Self.scratch("source")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "48M"], dir)
        try Self.tool(["qemu-io", "-f", "qcow2", "src.qcow2", "-c", "write -P 0x61 0 40M", "-c", "write -z 1M 2M",
                       "-c", "write -P 0x62 44M 4k", "-c", "discard 10M 1M"], dir)
        let e = try NBDExport(dir + "/src.qcow2", dir: dir, bitmap: nil)
        defer { e.kill() }
        let source = NBDSource(try NBDClient(uri: e.uri, contexts: [NBDSource.allocationContext]))
        #expect(source.virtualSize == 48 * Self.mib)
        var data: [(UInt64, UInt64)] = []
        try source.forEachExtent(from: 0, to: source.virtualSize) { start, x in
            let first = try source.extent(at: start, maxLength: x.length)
            #expect(first == x, "extent(at: \(start)) \(first) differs from the walk's \(x)")
            guard x.kind == .data else { return }
            if let last = data.last, last.0 + last.1 == start { data[data.count - 1].1 += x.length } else { data.append((start, x.length)) }
        }
        var expected: [(UInt64, UInt64)] = []
        for (s, n) in try Self.dataRanges("src.qcow2", dir) {
            if let last = expected.last, last.0 + last.1 == s { expected[expected.count - 1].1 += n } else { expected.append((s, n)) }
        }
        #expect(data.map { [$0.0, $0.1] } == expected.map { [$0.0, $0.1] }, "NBD data \(data), qemu-img map \(expected)")
        // 36 MiB from 3 MiB: more than the server's 32 MiB maximum request, the discarded
        // MiB at 10 MiB reading as zeros.
        var expectedBytes = [UInt8](repeating: 0x61, count: 36 << 20)
        for i in (7 << 20)..<(8 << 20) { expectedBytes[i] = 0 }
        #expect(try source.read(count: 36 << 20, at: 3 * Self.mib) == expectedBytes, "the bytes read over NBD differ from what qemu-io wrote")
    }

    // MARK: qemu-storage-daemon: a running disk and point-in-time views

    /// A running disk (qemu-storage-daemon) with guest writes before and after each view
    /// starts: the full backup and two incrementals pulled from the views equal the disk as
    /// it was when each view started (qemu-img's copy of it taken at that instant), and the
    /// writes made after it are in the next increment, not in this one.
    @Test(.requiresQEMU, .requiresStorageDaemon, arguments: [UInt64(65536), 2 << 20])
    func liveDiskPointInTime(_ cluster: UInt64) throws {
        guard Env.qemuStorageDaemon != nil else { throw TestFailure("qemu-storage-daemon not found on PATH (install qemu-system-common)") }
        let dir = try Self.scratch("live")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "disk.qcow2", "32M"], dir)
        try Self.tool(["qemu-io", "-f", "qcow2", "disk.qcow2", "-c", "write -P 0x41 0 2M", "-c", "write -P 0x42 8M 512k"], dir)
        let vm = try LiveDisk(dir + "/disk.qcow2", dir: dir)
        defer { vm.stop() }
        let o = ["-o", "cluster_size=\(cluster)"]
        let before = [["write -P 0x51 1M 64k"], ["write -z 0 128k", "write -P 0x61 16M 1M"], ["write -z 8M 64k", "write -P 0x71 30M 4k"]]
        let after = [["write -P 0x58 4M 64k", "write -P 0x59 1M 4k"], ["write -P 0x68 16M 64k", "write -P 0x69 24M 2M"], ["write -P 0x78 0 1M"]]
        var previous: String?
        for n in 0..<3 {
            let label = "cluster \(cluster), point \(n)"
            try vm.write(before[n])
            try vm.snapshot("ref\(n).qcow2")
            let old = n == 0 ? nil : "bm\(n - 1)"
            try vm.startView(n, newBitmap: "bm\(n)", oldBitmap: old)
            try vm.write(after[n])
            let target = "point\(n).qcow2"
            var args = ["backup", "--nbd", vm.uri("snap\(n)")] + o
            if let previous, let old { args += ["--sync=incremental", "--bitmap", old, "-b", previous, "-F", "qcow2"] } else { args += ["--sync=full"] }
            try Self.qimg(args + [target], dir)
            try Self.expectIdentical("ref\(n).qcow2", target, dir, label)
            try Self.expectHolesKept(target, source: "ref\(n).qcow2", cluster: cluster, dir, label)
            try expectCheckClean(target, dir, label)
            try vm.endView(n, oldBitmap: old)
            previous = target
        }
        // The disk's data ended at 8.5 MiB when point 0 was taken: the rest stays a hole.
        let end = (8 * Self.mib + 512 * 1024 + cluster - 1) / cluster * cluster
        #expect(try Self.dataRanges("point0.qcow2", dir).allSatisfy { $0.0 + $0.1 <= end }, "a hole of the disk was copied as data")
    }

    // MARK: Failures: one line naming the URI, non-zero exit, no target

    /// Expects a failed pull: exit 1, one stderr line starting `qimg: URI: `, and nothing
    /// left in `dir` but `keep`.
    static func expectFailure(_ args: [String], uri: String, _ dir: String, keep: Set<String>, _ label: String) throws {
        let r = try Qimg.run(args, cwd: dir)
        #expect(r.status == 1 && !r.signaled, "\(label): \(r.summary)")
        #expect(r.stderrLines.count == 1 && r.err.hasPrefix("qimg: \(uri): "), "\(label): stderr \(r.err)")
        let left = Set(try FileManager.default.contentsOfDirectory(atPath: dir)).subtracting(keep)
        #expect(left.isEmpty, "\(label): left behind \(left.sorted())")
    }

    /// A bitmap the export does not offer, an export that does not exist, a socket nobody
    /// listens on, a refused TCP connection and a URI libnbd rejects.
    @Test(.requiresQEMU) func unreachableOrIncompleteExports() throws {
        let dir = try Self.scratch("errors")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "8M"], dir)
        try Self.tool(["qemu-img", "bitmap", "--add", "src.qcow2", "b0"], dir)
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "prev.qcow2", "8M"], dir)
        let e = try NBDExport(dir + "/src.qcow2", dir: dir, bitmap: "b0")
        defer { e.kill() }
        var keep: Set = ["src.qcow2", "prev.qcow2", "nbd.sock"]
        let inc = ["--sync=incremental", "--bitmap", "nope", "-b", "prev.qcow2", "-F", "qcow2", "t.qcow2"]
        try Self.expectFailure(["backup", "--nbd", e.uri] + inc, uri: e.uri, dir, keep: keep, "bitmap not exported")
        let r = try Qimg.run(["backup", "--nbd", e.uri] + inc, cwd: dir)
        #expect(r.err.contains("'nope'"), "the missing bitmap is named: \(r.err)")
        for uri in ["nbd+unix:///other?socket=\(e.socket)", "nbd+unix:///disk?socket=\(dir)/none.sock",
                    "nbd://127.0.0.1:1/disk", "nbd:/\(dir)"] {
            try Self.expectFailure(["backup", "--nbd", uri, "t.qcow2"], uri: uri, dir, keep: keep, uri)
        }
        // A previous backup of another size cannot be the backing file.
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "small.qcow2", "4M"], dir)
        keep.insert("small.qcow2")
        try Self.expectFailure(["backup", "--nbd", e.uri, "--sync=incremental", "--bitmap", "b0", "-b", "small.qcow2", "-F", "qcow2", "t.qcow2"],
                               uri: "small.qcow2", dir, keep: keep, "backing file of another size")
        // Option mistakes are refused before anything is read or written.
        for (args, label) in [(["--sync=top", "t.qcow2"], "sync=top"), (["--bitmap", "b0", "t.qcow2"], "full with a bitmap"),
                              (["src.qcow2", "t.qcow2"], "two arguments"), (["--sync=incremental", "--bitmap", "b0", "t.qcow2"], "no -b")] {
            try Self.expectFailure(["backup", "--nbd", e.uri] + args, uri: e.uri, dir, keep: keep, label)
        }
    }

    /// Waits (polling) until `q`'s copy has written more than 4 MiB into its temporary file
    /// in `dir` (true), or `q` exits first (false).
    static func copyUnderWay(_ q: Spawned, _ dir: String) -> Bool {
        while q.isRunning {
            let files = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
            if files.contains(where: { name in
                var st = stat()
                return name.hasSuffix(".qimg-tmp") && stat(dir + "/" + name, &st) == 0 && st.st_size > 4 << 20
            }) { return true }
            usleep(10_000)
        }
        return false
    }

    /// The server killed while qimg copies (throttled so that the kill lands mid-copy):
    /// qimg fails with one line naming the URI, and leaves neither the target nor its
    /// temporary file.
    @Test(.requiresQEMU) func serverKilledMidCopy() throws {
        let dir = try Self.scratch("killed")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "64M"], dir)
        try Self.tool(["qemu-io", "-f", "qcow2", "src.qcow2", "-c", "write -P 0x5a 0 48M"], dir)
        let e = try NBDExport(dir + "/src.qcow2", dir: dir, bitmap: nil)
        let q = try Spawned(Qimg.path, ["backup", "--nbd", e.uri, "--speed", "8M", "t.qcow2"], cwd: dir)
        #expect(Self.copyUnderWay(q, dir), "qimg ended before the copy was under way: \(q.summary) \(q.err)")
        e.kill()
        q.wait(timeout: Runner.backstopSeconds)
        #expect(q.status == 1 && !q.signaled, "\(q.summary)")
        #expect(q.stderrLines.count == 1 && q.err.hasPrefix("qimg: \(e.uri): "), "stderr: \(q.err)")
        let left = Set(try FileManager.default.contentsOfDirectory(atPath: dir)).subtracting(["src.qcow2", "nbd.sock"])
        #expect(left.isEmpty, "left behind \(left.sorted())")
    }

    /// A server that accepts the connection but never answers (qemu-nbd serves one client
    /// at a time and another holds it): qimg waits in the handshake, a SIGTERM ends it with
    /// 143, one line and no file; once the other client leaves, the same backup works.
    @Test(.requiresQEMU) func busyServerDoesNotHangAndASignalEndsTheWait() throws {
        let dir = try Self.scratch("busy")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "8M"], dir)
        try Self.tool(["qemu-io", "-f", "qcow2", "src.qcow2", "-c", "write -P 0x5a 0 1M"], dir)
        let e = try NBDExport(dir + "/src.qcow2", dir: dir, bitmap: nil)
        let holder = try connectUnixSocket(e.socket, alive: { e.process.isRunning })
        let q = try Spawned(Qimg.path, ["backup", "--nbd", e.uri, "t.qcow2"], cwd: dir)
        // Wait (polling) until qimg has its socket: it is then in the handshake.
        var connected = false
        while q.isRunning && !connected {
            let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(q.pid)/fd")) ?? []
            connected = fds.contains { fd in
                ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(q.pid)/fd/\(fd)")) ?? "").hasPrefix("socket:")
            }
            if !connected { usleep(10_000) }
        }
        #expect(connected, "qimg ended before it connected: \(q.summary) \(q.err)")
        q.send(SIGTERM)
        q.wait(timeout: Runner.backstopSeconds)
        #expect(q.status == 143 && !q.signaled, "\(q.summary)")
        #expect(q.stderrLines.count == 1 && q.err.hasPrefix("qimg: "), "stderr: \(q.err)")
        let left = Set(try FileManager.default.contentsOfDirectory(atPath: dir)).subtracting(["src.qcow2", "nbd.sock"])
        #expect(left.isEmpty, "left behind \(left.sorted())")
        close(holder)
        let r = try Self.qimg(["backup", "--nbd", e.uri, "t.qcow2"], dir)
        #expect(r.status == 0, "\(r.err)")
        try Self.expectIdentical("src.qcow2", "t.qcow2", dir, "after the other client left")
    }

    /// A read that fails (EIO injected by blkdebug under the qcow2 driver at guest 20 MiB
    /// of 48 MiB of data) while the next reads are in flight: qimg fails with one line
    /// naming the URI and leaves neither the target nor its temporary file. (QEMU 7.2's
    /// server drops the connection after a failed read, so the read qimg reports failing
    /// may be an earlier one still in flight.)
    @Test(.requiresQEMU) func readErrorDuringOverlappedReads() throws {
        let dir = try Self.scratch("readerr")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "64M"], dir)
        try Self.tool(["qemu-io", "-f", "qcow2", "src.qcow2", "-c", "write -P 0x5a 0 48M"], dir)
        let map = try Runner.qemuImg(["map", "--output=json", "src.qcow2"], cwd: dir)
        let bad = 20 * Self.mib
        // The host offset of guest `bad`: from the data extent holding it.
        let extents = try #require(try JSONSerialization.jsonObject(with: Data(map.out.utf8)) as? [[String: Any]])
        let e = try #require(extents.first { ($0["data"] as? Bool) == true && ($0["start"] as? UInt64 ?? 0) <= bad
                                            && ($0["start"] as? UInt64 ?? 0) + ($0["length"] as? UInt64 ?? 0) > bad })
        let host = (e["offset"] as? UInt64 ?? 0) + bad - (e["start"] as? UInt64 ?? 0)
        let opts = "driver=qcow2,file.driver=blkdebug,file.image.driver=file,file.image.filename=\(dir)/src.qcow2,"
            + "file.inject-error.0.event=read_aio,file.inject-error.0.errno=5,file.inject-error.0.sector=\(host / 512)"
        let x = try NBDExport(opts, dir: dir, bitmap: nil, imageOptions: true)
        defer { x.kill() }
        let r = try Qimg.run(["backup", "--nbd", x.uri, "t.qcow2"], cwd: dir)
        #expect(r.status == 1 && !r.signaled, "\(r.summary)")
        #expect(r.stderrLines.count == 1 && r.err.hasPrefix("qimg: \(x.uri): ") && r.err.contains("read of "), "stderr: \(r.err)")
        let left = Set(try FileManager.default.contentsOfDirectory(atPath: dir)).subtracting(["src.qcow2", "nbd.sock"])
        #expect(left.isEmpty, "left behind \(left.sorted())")
        // The export itself still serves the bytes before the bad one.
        let before = try NBDSource(NBDClient(uri: x.uri, contexts: [])).read(count: 4096, at: bad - 4096)
        #expect(before.allSatisfy { $0 == 0x5a })
    }

    /// Overlapped reads (pieces of 3 MiB + 4 KiB, four in flight) against the raw file
    /// qemu-nbd serves: one read across the server's 32 MiB request limit, reads of odd
    /// sizes across piece ends, a read that jumps back (the reads in flight are dropped), a
    /// read outside the announced ranges, and a full pull backup of the same file.
    @Test(.requiresQEMU) func overlappedReadsMatchTheExport() throws {
        let dir = try Self.scratch("overlap")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let size = 48 * Int(Self.mib)
        var rng = SeededRNG(state: 15)
        var bytes = [UInt8](repeating: 0, count: size)
        for i in stride(from: 0, to: size, by: 8) { withUnsafeBytes(of: rng.next()) { for j in 0..<8 { bytes[i + j] = $0[j] } } }
        try Data(bytes).write(to: URL(fileURLWithPath: dir + "/src.raw"))
        let x = try NBDExport(dir + "/src.raw", dir: dir, bitmap: nil, format: "raw")
        defer { x.kill() }
        do {  // qemu-nbd serves one client at a time: this one is closed before qimg connects.
            let source = NBDSource(try NBDClient(uri: x.uri, contexts: []))
            let mib = Int(Self.mib)
            source.willRead([(0, UInt64(40 * mib)), (UInt64(41 * mib), UInt64(3 * mib))], depth: 4, pieceSize: 3 * mib + 4096)
            var reads: [(Int, Int)] = [(0, 34 * mib + 123), (34 * mib + 123, 5000), (34 * mib + 5123, 5 * mib)]
            reads += [(mib, 2 * mib), (40 * mib - 777, 2 * mib), (41 * mib + 1, 3 * mib - 1), (44 * mib, 4 * mib)]
            for (at, n) in reads {
                let got = try source.read(count: n, at: UInt64(at))
                #expect(got == Array(bytes[at..<at + n]), "bytes \(at)+\(n) differ")
            }
        }
        try Self.qimg(["backup", "--nbd", x.uri, "full.qcow2"], dir)
        let r = try Runner.qemuImg(["compare", "-f", "raw", "-F", "qcow2", "src.raw", "full.qcow2"], cwd: dir)
        #expect(r.status == 0, "compare: \(r.out) \(r.err)")
        try expectCheckClean("full.qcow2", dir, "full")
    }

    /// A server that stops answering mid-copy (qemu-nbd SIGSTOPped once qimg's copy is under
    /// way): qimg gives up after `--nbd-timeout` seconds without a reply, with one line
    /// naming the URI, exit 1, neither the target nor its temporary file, and the exported
    /// bitmap as it was. The same server, continued, then serves the same backup.
    @Test(.requiresQEMU) func aServerThatStopsAnsweringMidCopyFailsAfterTheTimeout() throws {
        let dir = try Self.scratch("silent")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "64M"], dir)
        try Self.tool(["qemu-img", "bitmap", "--add", "src.qcow2", "b0"], dir)
        try Self.tool(["qemu-io", "-f", "qcow2", "src.qcow2", "-c", "write -P 0x5a 0 48M"], dir)
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "prev.qcow2", "64M"], dir)
        let dump = try BackupTests.dump("src.qcow2", "b0", dir).text
        let e = try NBDExport(dir + "/src.qcow2", dir: dir, bitmap: "b0")
        defer { e.process.send(SIGCONT); e.kill() }
        let args = ["backup", "--nbd", e.uri, "--nbd-timeout", "2", "--speed", "8M", "--sync=incremental", "--bitmap", "b0",
                    "-b", "prev.qcow2", "-F", "qcow2", "t.qcow2"]
        let q = try Spawned(Qimg.path, args, cwd: dir)
        #expect(Self.copyUnderWay(q, dir), "qimg ended before the copy was under way: \(q.summary) \(q.err)")
        e.process.send(SIGSTOP)
        q.wait(timeout: Runner.backstopSeconds)
        #expect(q.status == 1 && !q.signaled, "\(q.summary)")
        #expect(q.stderrLines.count == 1 && q.err.hasPrefix("qimg: \(e.uri): ") && q.err.contains("no reply from the server for 2 s"), "stderr: \(q.err)")
        let left = Set(try FileManager.default.contentsOfDirectory(atPath: dir)).subtracting(["src.qcow2", "prev.qcow2", "nbd.sock"])
        #expect(left.isEmpty, "left behind \(left.sorted())")
        e.process.send(SIGCONT)
        try Self.qimg(Array(args.filter { $0 != "--speed" && $0 != "8M" }), dir)
        try Self.expectIdentical("src.qcow2", "t.qcow2", dir, "after the server continued")
        e.kill()
        #expect(try BackupTests.dump("src.qcow2", "b0", dir).text == dump, "the bitmap is as it was")
    }

    /// `--nbd-timeout` takes a positive number of seconds, and only with --nbd.
    @Test func nbdTimeoutOptionIsChecked() throws {
        let dir = try Self.scratch("timeout-opt")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for (args, start) in [(["--nbd", "nbd://127.0.0.1:1/x", "--nbd-timeout", "0", "t.qcow2"], "qimg: nbd://127.0.0.1:1/x: --nbd-timeout"),
                              (["--nbd", "nbd://127.0.0.1:1/x", "--nbd-timeout", "nan", "t.qcow2"], "qimg: nbd://127.0.0.1:1/x: --nbd-timeout"),
                              (["--nbd-timeout", "5", "a.qcow2", "t.qcow2"], "qimg: a.qcow2: --nbd-timeout applies only with --nbd")] {
            let r = try Qimg.run(["backup"] + args, cwd: dir)
            #expect(r.status == 1 && r.stderrLines.count == 1 && r.err.hasPrefix(start), "\(args): \(r.summary): \(r.err)")
            #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == [], "\(args)")
        }
    }

    /// A full target disk: exit 5 (I/O error or no space, the code of every backup mode),
    /// one line, nothing left on it.
    @Test(.requiresQEMU) func aFullTargetDiskExits5() throws {
        let dir = try Self.scratch("enospc")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "64M"], dir)
        try Self.tool(["qemu-io", "-f", "qcow2", "src.qcow2", "-c", "write -P 0x5a 0 8M"], dir)
        let e = try NBDExport(dir + "/src.qcow2", dir: dir, bitmap: nil)
        defer { e.kill() }
        let fs = try SmallFilesystem(at: dir + "/small")
        defer { fs.unmount() }
        let r = try Qimg.run(["backup", "--nbd", e.uri, "small/t.qcow2"], cwd: dir)
        #expect(r.status == 5 && !r.signaled, "\(r.summary): \(r.err)")
        #expect(r.stderrLines.count == 1 && r.err.contains("No space left on device"), "stderr: \(r.err)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/small") == [])
    }

    // MARK: TCP and TLS

    /// Pull over TCP (`nbd://127.0.0.1:PORT/disk`): an incremental on the exported bitmap
    /// that equals the image.
    @Test(.requiresQEMU) func pullOverTCP() throws {
        let dir = try Self.scratch("tcp")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "16M"], dir)
        try Self.tool(["qemu-io", "-f", "qcow2", "src.qcow2", "-c", "write -P 0x11 0 4M"], dir)
        try Self.tool(["qemu-img", "convert", "-O", "qcow2", "src.qcow2", "prev.qcow2"], dir)
        try Self.tool(["qemu-img", "bitmap", "--add", "src.qcow2", "b0"], dir)
        try Self.tool(["qemu-io", "-f", "qcow2", "src.qcow2", "-c", "write -P 0x22 1M 64k", "-c", "write -P 0x33 9M 128k"], dir)
        let e = try NBDExport(dir + "/src.qcow2", dir: dir, bitmap: "b0", tcp: (try LoopbackTCP.freePort(), []))
        defer { e.kill() }
        #expect(e.uri.hasPrefix("nbd://127.0.0.1:"))
        try Self.qimg(["backup", "--nbd", e.uri, "--sync=incremental", "--bitmap", "b0", "-b", "prev.qcow2", "-F", "qcow2", "inc.qcow2"], dir)
        try Self.expectIdentical("src.qcow2", "inc.qcow2", dir, "incremental over TCP")
        try expectCheckClean("inc.qcow2", dir, "inc")
        #expect(try Self.dataRanges("inc.qcow2", dir, top: true).map { [$0.0, $0.1] } == [[1 << 20, 64 << 10], [9 << 20, 128 << 10]])
    }

    /// Pull over TLS: qemu-nbd with an x509 server certificate (made with openssl, for
    /// 127.0.0.1) requires TLS; qimg connects with `nbds://...?tls-certificates=DIR` (the CA)
    /// and the backup equals the image. Without TLS, or without the CA that signed the
    /// server's certificate, the connection is refused with one line and no file.
    @Test(.requiresQEMU) func pullOverTLSWithX509Certificates() throws {
        guard let openssl = Env.which("openssl") else { throw TestFailure("openssl is missing (Debian: openssl)") }
        let dir = try Self.scratch("tls")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.tool(["qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "16M"], dir)
        try Self.tool(["qemu-io", "-f", "qcow2", "src.qcow2", "-c", "write -P 0x44 2M 1M"], dir)
        for sub in ["server", "client", "other"] { try FileManager.default.createDirectory(atPath: "\(dir)/\(sub)", withIntermediateDirectories: true) }
        try "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
            .write(toFile: dir + "/server.ext", atomically: true, encoding: .utf8)
        for args in [["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "server/ca-cert.pem", "-days", "2", "-subj", "/CN=qimg test CA"],
                     ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other-key.pem", "-out", "other/ca-cert.pem", "-days", "2", "-subj", "/CN=another CA"],
                     ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server/server-key.pem", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
                     ["x509", "-req", "-in", "server.csr", "-CA", "server/ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
                      "-out", "server/server-cert.pem", "-days", "2", "-extfile", "server.ext"]] {
            let r = try Runner.run(openssl, args, cwd: dir)
            guard r.status == 0 else { throw TestFailure("openssl \(args[0]): \(r.err)") }
        }
        try FileManager.default.copyItem(atPath: dir + "/server/ca-cert.pem", toPath: dir + "/client/ca-cert.pem")
        let tls = ["--object", "tls-creds-x509,id=tls0,dir=\(dir)/server,endpoint=server,verify-peer=off", "--tls-creds", "tls0"]
        let port = try LoopbackTCP.freePort()
        let e = try NBDExport(dir + "/src.qcow2", dir: dir, bitmap: nil, tcp: (port, tls))
        defer { e.kill() }
        let base = "nbds://127.0.0.1:\(port)/disk?tls-certificates="
        let keep: Set = ["src.qcow2", "server", "client", "other", "server.ext", "server.csr", "ca-key.pem", "other-key.pem", "server/ca-cert.srl", "ca-cert.srl"]
        for uri in ["nbd://127.0.0.1:\(port)/disk", base + dir + "/other"] {
            try Self.expectFailure(["backup", "--nbd", uri, "t.qcow2"], uri: uri, dir, keep: keep, uri)
        }
        try Self.qimg(["backup", "--nbd", base + dir + "/client", "t.qcow2"], dir)
        try Self.expectIdentical("src.qcow2", "t.qcow2", dir, "full over TLS")
        try expectCheckClean("t.qcow2", dir, "t")
    }
}
