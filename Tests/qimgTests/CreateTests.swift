import Foundation
import Testing
import TestSupport

/// `qimg create` against `qemu-img create` with the same options: the same
/// "Formatting" line, the same `qemu-img info --output=json` (filename and
/// actual-size aside), the same map, and a clean `qemu-img check`.
struct CreateCase: Sendable, CustomTestStringConvertible {
    var args: [String]
    var size: String? = "5M"
    var testDescription: String { (args + [size ?? ""]).joined(separator: " ") }

    static let all: [CreateCase] = [
        CreateCase(args: ["-f", "qcow2"]),
        CreateCase(args: ["-f", "qcow2"], size: "1000"),
        CreateCase(args: ["-f", "qcow2"], size: "0"),
        CreateCase(args: ["-f", "qcow2", "-o", "compat=0.10"]),
        CreateCase(args: ["-f", "qcow2", "-o", "compat=v3"]),
        CreateCase(args: ["-f", "qcow2", "-o", "cluster_size=512"], size: "1G"),
        CreateCase(args: ["-f", "qcow2", "-o", "cluster_size=4k"]),
        CreateCase(args: ["-f", "qcow2", "-o", "cluster_size=2M"], size: "1G"),
        CreateCase(args: ["-f", "qcow2", "-o", "refcount_bits=1"]),
        CreateCase(args: ["-f", "qcow2", "-o", "refcount_bits=8,cluster_size=4k"]),
        CreateCase(args: ["-f", "qcow2", "-o", "refcount_bits=64,cluster_size=512"], size: "64M"),
        CreateCase(args: ["-f", "qcow2", "-o", "lazy_refcounts=on"]),
        CreateCase(args: ["-f", "qcow2", "-o", "extended_l2=on"], size: "1G"),
        CreateCase(args: ["-f", "qcow2", "-o", "extended_l2=on,cluster_size=16k"]),
        CreateCase(args: ["-f", "qcow2", "-o", "compression_type=zstd"]),
        CreateCase(args: ["-f", "qcow2", "-o", "preallocation=metadata"]),
        CreateCase(args: ["-f", "qcow2", "-o", "preallocation=falloc"]),
        CreateCase(args: ["-f", "qcow2", "-o", "preallocation=full", "-o", "cluster_size=4k"]),
        CreateCase(args: ["-f", "qcow2", "-o", "extended_l2=on,preallocation=metadata,cluster_size=32k"], size: "3M"),
        CreateCase(args: ["-f", "qcow2", "-o", "cluster_size=64k,lazy_refcounts=yes,compat=1.1,refcount_bits=32"]),
        CreateCase(args: ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"], size: nil),
        CreateCase(args: ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"], size: "20M"),
        CreateCase(args: ["-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", "compat=0.10"], size: nil),
        CreateCase(args: ["-f", "qcow2", "-u", "-b", "absent.qcow2", "-F", "qcow2"], size: "7M"),
        CreateCase(args: ["-f", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2,extended_l2=on"], size: nil),
        CreateCase(args: ["-f", "qcow2", "-o", "cluster_size=512", "-b", "base.qcow2", "-F", "qcow2"], size: nil),
        CreateCase(args: ["-f", "qcow2", "-o", "encryption=off"]),
        CreateCase(args: ["-f", "qcow2", "-o", "encryption=on,encryption=off,compat=0.10"]),
        CreateCase(args: ["-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", "encryption=off"], size: nil),
        CreateCase(args: ["-f", "raw"], size: "1000"),
        CreateCase(args: ["-f", "raw", "-o", "preallocation=full"], size: "1M"),
        CreateCase(args: [], size: "64k"),
    ]

    /// Invalid requests: both tools fail with exit 1 and qimg leaves no file behind.
    static let invalid: [CreateCase] = [
        CreateCase(args: ["-f", "qcow2", "-o", "cluster_size=1000"]),
        CreateCase(args: ["-f", "qcow2", "-o", "refcount_bits=3"]),
        CreateCase(args: ["-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on"]),
        CreateCase(args: ["-f", "qcow2", "-o", "compat=0.10,extended_l2=on"]),
        CreateCase(args: ["-f", "qcow2", "-o", "compat=0.10,compression_type=zstd"]),
        CreateCase(args: ["-f", "qcow2", "-o", "compat=0.10,refcount_bits=8"]),
        CreateCase(args: ["-f", "qcow2", "-o", "extended_l2=on,cluster_size=8k"]),
        CreateCase(args: ["-f", "qcow2", "-o", "compat=foo"]),
        CreateCase(args: ["-f", "qcow2", "-o", "preallocation=foo"]),
        CreateCase(args: ["-f", "qcow2", "-o", "foo=bar"]),
        CreateCase(args: ["-f", "qcow2", "-o", "lazy_refcounts=maybe"]),
        CreateCase(args: ["-f", "qcow2"], size: "abc"),
        CreateCase(args: ["-f", "qcow2"], size: nil),
        CreateCase(args: ["-f", "qcow2", "-b", "base.qcow2"], size: nil),
        CreateCase(args: ["-f", "qcow2", "-b", "absent.qcow2", "-F", "qcow2"], size: nil),
        CreateCase(args: ["-f", "qcow2", "-o", "preallocation=metadata", "-b", "base.qcow2", "-F", "qcow2"], size: nil),
        CreateCase(args: ["-f", "raw", "-o", "preallocation=metadata"], size: "1M"),
        CreateCase(args: ["-f", "qcow2", "-o", "cluster_size=512"], size: "1T"),
        CreateCase(args: ["-f", "qcow2", "-o", "encryption=on"]),
        CreateCase(args: ["-f", "qcow2", "-o", "encryption"]),
        CreateCase(args: ["-f", "qcow2", "-o", "encryption=no"]),
        CreateCase(args: ["-f", "qcow2", "-o", "encryption=OFF"]),
        CreateCase(args: ["-f", "raw", "-o", "encryption=off"]),
    ]
}

@Suite struct CreateTests {
    static func scratch(_ name: String) throws -> String {
        let dir = try Paths.newScratch("create-\(name)")
        for (args, ok) in [(["create", "-q", "-f", "qcow2", "base.qcow2", "12M"], true),
                           (["create", "-q", "-f", "raw", "base.raw", "3000000"], true)] {
            let r = try Runner.qemuImg(args, cwd: dir)
            if ok && r.status != 0 { throw TestFailure("setup: \(r.summary) \(r.err)") }
        }
        return dir
    }

    /// `qemu-img info --output=json` without the lines that must differ.
    static func info(_ file: String, cwd: String) throws -> String {
        let r = try Runner.qemuImg(["info", "--output=json", file], cwd: cwd)
        return r.out.split(separator: "\n").filter { !$0.contains("\"filename\"") && !$0.contains("\"actual-size\"") }.joined(separator: "\n")
    }

    @Test(.requiresQEMU, arguments: CreateCase.all)
    func createMatchesQemuImg(_ c: CreateCase) throws {
        let dir = try Self.scratch("ok")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let tail = c.size.map { [$0] } ?? []
        let isRaw = !c.args.contains("qcow2")
        let ext = isRaw ? "raw" : "qcow2"
        let q = try Runner.qemuImg(["create"] + c.args + ["ref.\(ext)"] + tail, cwd: dir)
        let m = try Qimg.run(["create"] + c.args + ["new.\(ext)"] + tail, cwd: dir)
        #expect(q.status == 0 && m.status == 0, "qemu: \(q.err) qimg: \(m.err)")
        #expect(m.out.replacingOccurrences(of: "new.\(ext)", with: "X") == q.out.replacingOccurrences(of: "ref.\(ext)", with: "X"))
        #expect(try Self.info("new.\(ext)", cwd: dir) == (try Self.info("ref.\(ext)", cwd: dir)))
        let mq = try Runner.qemuImg(["map", "--output=json", "ref.\(ext)"], cwd: dir)
        let mm = try Runner.qemuImg(["map", "--output=json", "new.\(ext)"], cwd: dir)
        // With falloc/full preallocation qemu-img moves its refcount table, so host
        // offsets differ; the guest view must still be the same.
        let prealloc = c.args.contains { $0.contains("preallocation=f") }
        func view(_ s: String) -> String {
            guard prealloc else { return s }
            // Drop offsets and merge neighbours with the same flags.
            var out: [(start: Int, length: Int, flags: String)] = []
            for line in s.split(separator: "\n") {
                let fields = line.split(separator: ",").map { $0.trimmingCharacters(in: CharacterSet(charactersIn: "[]{} ")) }
                guard fields.count >= 6 else { continue }
                let start = Int(fields[0].split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) ?? -1
                let length = Int(fields[1].split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) ?? -1
                let flags = fields[2...5].joined(separator: ",")
                if let last = out.last, last.flags == flags, last.start + last.length == start {
                    out[out.count - 1].length += length
                } else {
                    out.append((start, length, flags))
                }
            }
            return out.map { "\($0.start) \($0.length) \($0.flags)" }.joined(separator: "\n")
        }
        #expect(view(mm.out) == view(mq.out))
        // The header cluster byte for byte (header, extensions, backing name): e.g. no
        // feature name table with clusters of 4 KiB or less, as qemu-img writes them.
        if !isRaw && !prealloc {
            let info = try Runner.qemuImg(["info", "--output=json", "ref.qcow2"], cwd: dir)
            let cs = (try JSONSerialization.jsonObject(with: Data(info.out.utf8)) as? [String: Any])?["cluster-size"] as? Int ?? 0
            let ref = FileManager.default.contents(atPath: dir + "/ref.qcow2") ?? Data()
            let new = FileManager.default.contents(atPath: dir + "/new.qcow2") ?? Data()
            #expect(cs > 0 && ref.prefix(cs) == new.prefix(cs), "\(c.testDescription): header cluster differs from qemu-img's")
        }
        if !isRaw && !c.args.contains("-u") {
            try expectCheckClean("new.qcow2", dir, c.testDescription)
        }
    }

    @Test(.requiresQEMU, arguments: CreateCase.invalid)
    func invalidCreateFailsAndLeavesNoFile(_ c: CreateCase) throws {
        let dir = try Self.scratch("bad")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let tail = c.size.map { [$0] } ?? []
        let q = try Runner.qemuImg(["create"] + c.args + ["ref.img"] + tail, cwd: dir)
        let m = try Qimg.run(["create"] + c.args + ["new.img"] + tail, cwd: dir)
        #expect(q.status == 1 && m.status == 1, "qemu \(q.status), qimg \(m.status): \(m.err)")
        #expect(m.stderrLines.count == 1 && m.err.hasPrefix("qimg: "), "\(m.err)")
        if c.args.contains(where: { $0.hasPrefix("encryption") }) {
            // qemu-img's words, and its "Formatting" line when it prints one.
            #expect(m.err == qimgMessages(q.err.replacingOccurrences(of: "ref.img", with: "new.img")), "\(m.err) vs \(q.err)")
            #expect(m.out == q.out.replacingOccurrences(of: "ref.img", with: "new.img"), "\(m.out) vs \(q.out)")
        }
        #expect(!FileManager.default.fileExists(atPath: dir + "/new.img"))
        // An existing file is never destroyed by a failed create (qemu-img deletes it).
        try Data("keep me".utf8).write(to: URL(fileURLWithPath: dir + "/old.img"))
        _ = try Qimg.run(["create"] + c.args + ["old.img"] + tail, cwd: dir)
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir + "/old.img")) == Data("keep me".utf8))
    }

    /// The reverse direction: QEMU writes into images qimg created, qimg reads it back exactly.
    @Test(.requiresQEMU, arguments: [["-o", "cluster_size=64k"], ["-o", "compat=0.10"], ["-o", "cluster_size=512,refcount_bits=64"],
                                     ["-o", "extended_l2=on"], ["-o", "compression_type=zstd,lazy_refcounts=on"]])
    func qemuWritesQimgReads(_ opts: [String]) throws {
        let dir = try Self.scratch("rev")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let m = try Qimg.run(["create", "-q", "-f", "qcow2"] + opts + ["img.qcow2", "8M"], cwd: dir)
        #expect(m.status == 0, "\(m.err)")
        let w = try Runner.qemuIO(["-f", "qcow2", "-c", "write -P 0x5a 1000 300000", "-c", "write -z 1M 64k",
                                   "-c", "write -c -P 0x6b 2M 64k", "-c", "write -P 0x7c 7M 1M", "-c", "discard 7M 64k", "img.qcow2"], cwd: dir)
        #expect(w.status == 0, "\(w.out)\(w.err)")
        for (pattern, off, len) in [("0x5a", "1000", "300000"), ("0", "1M", "64k"), ("0x6b", "2M", "64k"),
                                    ("0", "7M", "64k"), ("0x7c", "7232k", "960k"), ("0", "3M", "1M")] {
            let r = try Qimg.run(["io", "-c", "read -P \(pattern) \(off) \(len)", "img.qcow2"], cwd: dir)
            #expect(r.status == 0, "read -P \(pattern) \(off) \(len): \(r.err)")
        }
        let check = try Qimg.run(["check", "img.qcow2"], cwd: dir)
        let qcheck = try Runner.qemuImg(["check", "img.qcow2"], cwd: dir)
        #expect(check.status == 0 && check.out == qcheck.out)
    }
}
