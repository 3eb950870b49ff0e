import Foundation
import Testing
import TestSupport

/// `-c` with zlib compression: igzip by default, `--zlib=qemu` for qemu-img's own streams.
/// QEMU reads what either writes (qemu-img compare, check); `--zlib=qemu` writes the file
/// qemu-img writes, byte for byte.
@Suite struct ZlibEncoderTests {
    /// 4 MiB of text-like lines from a seeded pool (as the bench's compressible workload),
    /// with a 1 MiB hole of zeros.
    static func makeText(_ path: String) throws {
        var state: UInt64 = 42
        func next(_ n: Int) -> Int {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Int(state >> 33) % n
        }
        let letters = Array("abcdefghijklmnopqrstuvwxyz".utf8)
        let words = (0..<800).map { _ in (0..<(2 + next(9))).map { _ in letters[next(26)] } }
        let pool = (0..<2000).map { _ -> [UInt8] in
            var line = Array(String(format: "%06d", next(1_000_000)).utf8)
            for _ in 0..<(3 + next(15)) { line += [32] + words[next(words.count)] }
            return line + [10]
        }
        var data: [UInt8] = []
        data.reserveCapacity(4 << 20)
        while data.count < 4 << 20 { data += pool[next(pool.count)] }
        data.removeLast(data.count - (4 << 20))
        data.replaceSubrange((2 << 20)..<(3 << 20), with: [UInt8](repeating: 0, count: 1 << 20))
        #expect(FileManager.default.createFile(atPath: path, contents: Data(data)))
    }

    static func size(_ path: String) throws -> Int {
        try (FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.intValue ?? -1
    }

    @Test(.requiresQEMU)
    func igzipStreamsReadInQEMUAndQemuStreamsAreQemuImgs() throws {
        let dir = try Paths.newScratch("zlib-encoder")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeText(dir + "/text.raw")
        let q = try Runner.qemuImg(["convert", "-c", "-O", "qcow2", "text.raw", "q.qcow2"], cwd: dir)
        #expect(q.status == 0, "\(q.err)")

        // Default: igzip. QEMU reads the same bytes, the image checks clean, its clusters
        // are compressed and the file is no larger than qemu-img's on this text.
        let m = try Qimg.run(["convert", "-c", "-O", "qcow2", "text.raw", "m.qcow2"], cwd: dir)
        #expect(m.status == 0, "\(m.err)")
        let cmp = try Runner.qemuImg(["compare", "-f", "raw", "-F", "qcow2", "text.raw", "m.qcow2"], cwd: dir)
        #expect(cmp.status == 0, "\(cmp.out)\(cmp.err)")
        try expectCheckClean("m.qcow2", dir, "igzip convert -c")
        let check = try Runner.qemuImg(["check", "--output=json", "m.qcow2"], cwd: dir)
        #expect(check.out.contains("\"compressed-clusters\": 48"), "\(check.out)")
        #expect(try Self.size(dir + "/m.qcow2") <= Self.size(dir + "/q.qcow2"))

        // --zlib=qemu: qemu-img's file, byte for byte.
        let z = try Qimg.run(["convert", "-c", "--zlib=qemu", "-O", "qcow2", "text.raw", "z.qcow2"], cwd: dir)
        #expect(z.status == 0, "\(z.err)")
        #expect(FileManager.default.contents(atPath: dir + "/z.qcow2") == FileManager.default.contents(atPath: dir + "/q.qcow2"))

        // backup -c goes the same way: QEMU reads both encoders' backups as the source.
        for (name, extra) in [("b-igzip.qcow2", [String]()), ("b-qemu.qcow2", ["--zlib=qemu"])] {
            let b = try Qimg.run(["backup", "--sync=full", "-c"] + extra + ["-f", "raw", "text.raw", name], cwd: dir)
            #expect(b.status == 0, "\(name): \(b.err)")
            let c = try Runner.qemuImg(["compare", "-f", "raw", "-F", "qcow2", "text.raw", name], cwd: dir)
            #expect(c.status == 0, "\(name): \(c.out)\(c.err)")
            try expectCheckClean(name, dir, "backup -c \(extra)")
        }
        #expect(try Self.size(dir + "/b-igzip.qcow2") <= Self.size(dir + "/q.qcow2"))
    }

    /// --zlib without -c, or an unknown encoder: refused, and no target is made.
    @Test func zlibWithoutCompressionIsRefused() throws {
        let dir = try Paths.newScratch("zlib-encoder-usage")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        #expect(FileManager.default.createFile(atPath: dir + "/s.raw", contents: Data(count: 1 << 20)))
        for args in [["convert", "--zlib=qemu", "-O", "qcow2", "s.raw", "t.qcow2"],
                     ["backup", "--sync=full", "--zlib=igzip", "-f", "raw", "s.raw", "t.qcow2"],
                     ["convert", "-c", "--zlib=fast", "-O", "qcow2", "s.raw", "t.qcow2"]] {
            let r = try Qimg.run(args, cwd: dir)
            #expect(r.status != 0 && !r.signaled, "\(args)")
            #expect(r.err.contains("zlib"), "\(args): \(r.err)")
            #expect(!FileManager.default.fileExists(atPath: dir + "/t.qcow2"), "\(args)")
        }
        let r = try Qimg.run(["convert", "--zlib=qemu", "-O", "qcow2", "s.raw", "t.qcow2"], cwd: dir)
        #expect(r.err == "qimg: t.qcow2: --zlib applies only with -c\n", "\(r.err)")
    }
}
