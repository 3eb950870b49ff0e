import Foundation
import Testing
import TestSupport

/// convert -c and backup -c (issue 16, item 4: compression on every core, overlapped with
/// the reads and the writes): what qemu-img reads back is the source, qemu-img check finds
/// nothing, the file is no larger than qemu-img's own compressed copy and holds as many
/// compressed clusters; a failed or killed copy leaves no target.
@Suite(.requiresQEMU) struct CompressedCopyTests {
    typealias B = BackupTests

    /// `size` bytes of text-like data (lines of words from a small pool: zlib ~2x with
    /// QEMU's 4 KiB window), the same for a given seed.
    static func text(_ size: Int, seed: UInt64) -> [UInt8] {
        var rng = SeededRNG(state: seed)
        let letters = Array("abcdefghijklmnopqrstuvwxyz".utf8)
        let words = (0..<400).map { _ in (0..<Int.random(in: 2...10, using: &rng)).map { _ in letters.randomElement(using: &rng)! } }
        var out: [UInt8] = []
        out.reserveCapacity(size + 200)
        while out.count < size {
            out += Array(String(Int.random(in: 0..<1_000_000, using: &rng)).utf8)
            for _ in 0..<Int.random(in: 3...17, using: &rng) { out.append(0x20); out += words.randomElement(using: &rng)! }
            out.append(0x0A)
        }
        return Array(out[0..<size])
    }

    /// A 6 MiB + 1.5 KiB source (the last cluster partial for 64 KiB and 2 MiB clusters):
    /// text, incompressible noise, data that reads as zeros, zero clusters and holes.
    static func makeSource(_ dir: String) throws {
        let mib = 1 << 20
        var raw = text(6 * mib + 1536, seed: 0xC0FFEE)
        var rng = SeededRNG(state: 7)
        for i in (2 * mib)..<(2 * mib + 200_000) { raw[i] = UInt8.random(in: 0...255, using: &rng) }
        for i in (3 * mib)..<(3 * mib + 300_000) { raw[i] = 0 }
        try Data(raw).write(to: URL(fileURLWithPath: dir + "/src.raw"))
        try B.tool(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", "src.raw", "src.qcow2"], dir)
        try B.tool(["qemu-io", "-f", "qcow2", "-c", "write -z 4M 512k", "-c", "discard 5M 300k", "-c", "write -z 1000k 8k", "src.qcow2"], dir)
    }

    static func size(_ dir: String, _ file: String) throws -> Int {
        try FileManager.default.attributesOfItem(atPath: dir + "/" + file)[.size] as? Int ?? -1
    }

    /// `qemu-img check --output=json`'s compressed-clusters.
    static func compressedClusters(_ dir: String, _ file: String) throws -> Int {
        let r = try Runner.qemuImg(["check", "--output=json", file], cwd: dir)
        let json = try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any]
        return json?["compressed-clusters"] as? Int ?? -1
    }

    @Test(arguments: ["zlib", "zstd"])
    func matchesQemuImg(_ type: String) throws {
        let dir = try Paths.newScratch("compressed-copy-\(type)")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeSource(dir)
        for cluster in ["4k", "64k", "2M"] {
            let o = ["-o", "cluster_size=\(cluster),compression_type=\(type)"]
            try B.tool(["qemu-img", "convert", "-c", "-O", "qcow2"] + o + ["src.qcow2", "q.qcow2"], dir)
            let theirs = try (Self.size(dir, "q.qcow2"), Self.compressedClusters(dir, "q.qcow2"))
            #expect(theirs.1 > 0, "\(type) \(cluster): qemu-img compressed nothing (the source is not compressible)")
            for (name, args) in [("convert", ["convert", "-c", "-O", "qcow2"] + o + ["src.qcow2", "m.qcow2"]),
                                 ("backup", ["backup", "-q", "--sync=full", "-c"] + o + ["src.qcow2", "m.qcow2"])] {
                try? FileManager.default.removeItem(atPath: dir + "/m.qcow2")
                let label = "\(name) -c \(type) cluster_size=\(cluster)"
                let r = try Qimg.run(args, cwd: dir)
                try #require(r.status == 0, "\(label): \(r.err)")
                try expectCheckClean("m.qcow2", dir, label)
                let same = try Runner.qemuImg(["compare", "-f", "qcow2", "-F", "qcow2", "src.qcow2", "m.qcow2"], cwd: dir)
                #expect(same.status == 0, "\(label): \(same.out)\(same.err)")
                let info = try Runner.qemuImg(["info", "m.qcow2"], cwd: dir)
                #expect(info.out.contains("compression type: \(type)"), "\(label): \(info.out)")
                let mine = try Self.size(dir, "m.qcow2")
                #expect(mine <= theirs.0, "\(label): \(mine) bytes, qemu-img's \(theirs.0)")
                #expect(try Self.compressedClusters(dir, "m.qcow2") == theirs.1, "\(label): compressed clusters")
            }
        }
    }

    /// A read of the source failing (QIMG_FAULTS, debug builds), at each of its reads in
    /// turn: at open, then the data chunk by chunk while earlier chunks are compressed and
    /// written. Each failure is one line naming the source, exit 1, no target and no
    /// temporary file; the sweep ends at the first run with no read left to fail.
    @Test(arguments: ["convert", "backup"])
    func readErrorMidwayLeavesNoTarget(_ command: String) throws {
        let dir = try Paths.newScratch("compressed-read-error")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeSource(dir)
        let args = command == "convert" ? ["convert", "-c", "-O", "qcow2", "src.qcow2", "out.qcow2"]
                                        : ["backup", "-q", "--sync=full", "-c", "src.qcow2", "out.qcow2"]
        var failures = 0
        for n in 1...200 {
            let label = "\(command) -c with QIMG_FAULTS=read:\(n):EIO"
            let r = try Runner.run("/usr/bin/env", ["QIMG_FAULTS=read:\(n):EIO,prefix:src.qcow2", Qimg.path] + args, cwd: dir)
            if r.exitedNormally && r.status == 0 { break }
            failures += 1
            expectCleanFailure(label, r, exitCode: 1)
            #expect(r.err == "qimg: src.qcow2: read failed: Input/output error\n", "\(label): \(r.err)")
            #expect(!B.exists(dir, "out.qcow2") && !B.hasTemporary(dir, of: "out.qcow2"), "\(label): a target was left")
        }
        // The source's 6 MiB of data are read in at least 6 chunks after its metadata.
        #expect(failures >= 8 && failures < 200, "\(command): \(failures) reads failed")
        #expect(try Runner.qemuImg(["compare", "src.qcow2", "out.qcow2"], cwd: dir).status == 0)
        try expectCheckClean("src.qcow2", dir, "source after the faults")
    }

    /// SIGKILL while the compressed copy runs: no file at the target's name; the next run
    /// removes the leftover temporary file and writes a target qemu-img reads as the source.
    @Test func sigkillMidwayLeavesNoTarget() throws {
        let dir = try Paths.newScratch("compressed-kill")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let block = Self.text(1 << 20, seed: 3)
        try Data((0..<48).flatMap { i in block.map { $0 ^ UInt8(i & 1) } }).write(to: URL(fileURLWithPath: dir + "/src.raw"))
        try B.tool(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "src.raw", "src.qcow2"], dir)
        var rng = SeededRNG(state: 0x4B11)
        var killed = 0
        for attempt in 0..<4 {
            let args = attempt % 2 == 0 ? ["convert", "-c", "-O", "qcow2", "src.qcow2", "out.qcow2"]
                                        : ["backup", "-q", "--sync=full", "-c", "src.qcow2", "out.qcow2"]
            let p = try Spawned(Qimg.path, args, cwd: dir)
            while !B.hasTemporary(dir, of: "out.qcow2") && !p.wait(timeout: 0.002) {}
            usleep(useconds_t(UInt64.random(in: 0...200_000, using: &rng)))
            p.send(SIGKILL)
            guard p.wait(timeout: Runner.backstopSeconds) else { throw TestFailure("qimg did not die") }
            let label = "attempt \(attempt) (\(args.joined(separator: " ")))"
            if p.signaled && p.status == SIGKILL { killed += 1 }
            #expect(!B.exists(dir, "out.qcow2") || !(p.signaled), "\(label): the target exists after SIGKILL")
            try? FileManager.default.removeItem(atPath: dir + "/out.qcow2")
        }
        #expect(killed >= 3, "only \(killed) of 4 kills landed mid-copy (the test is not testing much)")
        let r = try Qimg.run(["convert", "-c", "-O", "qcow2", "src.qcow2", "out.qcow2"], cwd: dir)
        #expect(r.status == 0, "\(r.summary): \(r.err)")
        #expect(B.exists(dir, "out.qcow2") && !B.hasTemporary(dir, of: "out.qcow2"))
        #expect(try Runner.qemuImg(["compare", "src.qcow2", "out.qcow2"], cwd: dir).status == 0)
        try expectCheckClean("out.qcow2", dir, "after the kills")
    }
}
