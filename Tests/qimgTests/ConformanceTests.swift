import Foundation
import Testing
import TestSupport

/// Issue 13 items 12-14, each compared with qemu-img 7.2 on the same input.

/// A backing file name of QEMU's `json:` (or `file:`) form, and whether the overlay records
/// a backing format (qemu-img's create stores one; the driver-only shape must not have one).
struct BackingNameCase: Sendable, CustomTestStringConvertible {
    var name: String
    var backingFormat: String?
    var testDescription: String { name + (backingFormat.map { " (-F \($0))" } ?? "") }
}

let followedBackingNames: [BackingNameCase] = [
    BackingNameCase(name: #"json:{"driver": "qcow2", "file": {"driver": "file", "filename": "base.qcow2"}}"#, backingFormat: "qcow2"),
    BackingNameCase(name: #"json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}"#, backingFormat: nil),
    BackingNameCase(name: #"json:{"file.filename":"base.qcow2","driver":"qcow2"}"#, backingFormat: nil),
    BackingNameCase(name: #"json:{"file":{"filename":"base.qcow2"}}"#, backingFormat: "qcow2"),
    BackingNameCase(name: #"json:{"driver":"qcow2","file.driver":"file","file.filename":"sub/../base.qcow2"}"#, backingFormat: nil),
    // The file's own bytes (a qcow2 file read as a raw disk), as QEMU's file driver reads it.
    BackingNameCase(name: #"json:{"driver":"file","filename":"base.qcow2"}"#, backingFormat: nil),
    // backing_fmt wins over the json's driver (QEMU merges without overwriting).
    BackingNameCase(name: #"json:{"driver":"raw","file":{"driver":"file","filename":"base.qcow2"}}"#, backingFormat: "qcow2"),
    BackingNameCase(name: "file:base.qcow2", backingFormat: "qcow2"),
]

let refusedBackingNames: [(name: String, names: String)] = [
    (#"json:{"driver":"nbd","host":"localhost","port":"1"}"#, "'nbd'"),
    (#"json:{"driver":"qcow2","file":{"driver":"http","url":"http://localhost:1/b"}}"#, "'http'"),
    (#"json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"},"cache":{"direct":true}}"#, "'cache.direct'"),
    ("nbd:localhost:1", "'nbd'"),
    (#"json:{"driver":"qcow2","file":"#, "json"),
]

/// Rewrites a qcow2 file's header so that it names `name` as its backing file and records
/// no backing format (what qemu-img's create cannot write): extensions other than the
/// backing format kept, the name right after the end marker.
func setBackingName(_ path: String, _ name: String) throws {
    var h = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)).prefix(65536))
    func u32(_ o: Int) -> Int { h[o..<(o + 4)].reduce(0) { $0 << 8 | Int($1) } }
    func put(_ o: Int, _ v: UInt64, _ n: Int) { for k in 0..<n { h[o + k] = UInt8(truncatingIfNeeded: v >> UInt64(8 * (n - 1 - k))) } }
    let start = u32(100)
    var pos = start
    var kept: [UInt8] = []
    while u32(pos) != 0 {
        let len = 8 + (u32(pos + 4) + 7) & ~7
        if u32(pos) != 0xE279_2ACA { kept += h[pos..<(pos + len)] }
        pos += len
    }
    let bytes = kept + [UInt8](repeating: 0, count: 8) + Array(name.utf8)
    h.replaceSubrange(start..<(start + bytes.count), with: bytes)
    put(8, UInt64(start + kept.count + 8), 8)
    put(16, UInt64(name.utf8.count), 4)
    let fh = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
    try fh.write(contentsOf: Data(h))
    try fh.close()
}

@Suite struct ConformanceTests {
    /// A base with data and an overlay (data of its own) naming it `name`.
    static func backingPair(_ name: String, format: String?, in dir: String) throws {
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "1M"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 0xaa 0 192k", "-c", "write -z 512k 64k", "base.qcow2"], in: dir)
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "top.qcow2", "1M"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 0x55 64k 64k", "top.qcow2"], in: dir)
        if let format {
            try Runner.qemuStep(["qemu-img", "rebase", "-u", "-b", name, "-F", format, "top.qcow2"], in: dir)
        } else {
            try setBackingName(dir + "/top.qcow2", name)
        }
        try FileManager.default.createDirectory(atPath: dir + "/sub", withIntermediateDirectories: true)
    }

    /// Item 12: map, info and convert follow a json:/file: backing name as qemu-img does,
    /// relative names inside it against the working directory (not the overlay's).
    @Test(.requiresQEMU, arguments: followedBackingNames)
    func backingNameFollowedLikeQEMU(_ c: BackingNameCase) throws {
        let dir = try Paths.newScratch("json-backing")
        try Self.backingPair(c.name, format: c.backingFormat, in: dir)
        for args in [["map", "top.qcow2"], ["map", "--output=json", "top.qcow2"], ["info", "--backing-chain", "top.qcow2"],
                     ["info", "--output=json", "top.qcow2"], ["compare", "top.qcow2", "top.qcow2"]] {
            let (q, m) = try runBoth(args, cwd: dir)
            #expect(q.status == 0, "qemu-img \(args): \(q.err)")
            expectSameExit(args.joined(separator: " "), qemu: q, qimg: m)
            expectSameStdout(args.joined(separator: " "), qemu: q, qimg: m)
        }
        // From another directory the overlay opens, its json-named backing file does not (for both).
        for args in [["info", "../top.qcow2"], ["map", "../top.qcow2"]] {
            let (q, m) = try runBoth(args, cwd: dir + "/sub")
            expectSameExit("in sub/: \(args)", qemu: q, qimg: m)
            expectSameStdout("in sub/: \(args)", qemu: q, qimg: m)
        }
        let m = try Qimg.run(["convert", "-O", "qcow2", "top.qcow2", "mine.qcow2"], cwd: dir)
        #expect(m.status == 0, "qimg convert: \(m.err)")
        try Runner.qemuStep(["qemu-img", "convert", "-O", "qcow2", "top.qcow2", "theirs.qcow2"], in: dir)
        let cmp = try Runner.qemuImg(["compare", "-f", "qcow2", "-F", "qcow2", "theirs.qcow2", "mine.qcow2"], cwd: dir)
        #expect(cmp.status == 0, "qimg's convert differs from qemu-img's: \(cmp.out)\(cmp.err)")
    }

    /// Item 12: names qimg cannot follow are refused with one line naming what is not
    /// supported, where qemu-img fails too (no server) or follows something qimg does not.
    @Test(.requiresQEMU) func unsupportedBackingNamesRefused() throws {
        for (name, what) in refusedBackingNames {
            let dir = try Paths.newScratch("json-backing-refused")
            try Self.backingPair(name, format: nil, in: dir)
            let before = try FileState(dir + "/top.qcow2")
            for args in [["map", "top.qcow2"], ["convert", "-O", "qcow2", "top.qcow2", "out.qcow2"], ["check", "top.qcow2"]] {
                let r = try Qimg.run(args, cwd: dir)
                expectCleanFailure("\(name): \(args)", r, exitCode: 1)
                #expect(r.err.contains(what), "\(name): \(args): \(r.err)")
            }
            #expect(!FileManager.default.fileExists(atPath: dir + "/out.qcow2"))
            #expect(try FileState(dir + "/top.qcow2") == before)
            let (q, m) = try runBoth(["info", "top.qcow2"], cwd: dir)
            expectSameExit("info \(name)", qemu: q, qimg: m)
            expectSameStdout("info \(name)", qemu: q, qimg: m)
        }
    }
}

/// An encrypted image as qemu-img creates it: options after `encrypt.format=`.
struct EncryptedCase: Sendable, CustomTestStringConvertible {
    var format: String
    var options: String
    var testDescription: String { format + (options.isEmpty ? "" : " " + options) }
}

let encryptedCases: [EncryptedCase] = [
    EncryptedCase(format: "luks", options: ""),
    EncryptedCase(format: "luks", options: "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1"),
    EncryptedCase(format: "luks", options: "encrypt.cipher-alg=twofish-256,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512"),
    EncryptedCase(format: "aes", options: ""),
]

extension ConformanceTests {
    static let secret = ["--object", "secret,id=sec0,data=x"]

    /// Every write (and with `reads`, every data read) refused with one line naming `what`,
    /// every file left as it was.
    static func expectDataRefused(_ image: String, in dir: String, naming what: String, files: [String], reads: Bool) throws {
        let before = try files.map { try FileState(dir + "/" + $0) }
        let readers: [([String], Int32)] = [
            (["convert", "-O", "qcow2", image, "out.qcow2"], 1), (["compare", image, image], 4),  // compare's "data could not be read"
            (["io", "-c", "read 0 64k", image], 1), (["backup", "--sync=full", image, "out.qcow2"], 1),
        ]
        let writers: [([String], Int32)] = [
            (["io", "-c", "write 0 64k", image], 1), (["resize", image, "2M"], 1),
            (["amend", "-o", "lazy_refcounts=on", image], 1), (["bitmap", "--add", image, "b0"], 1),
            (["check", "-r", "all", image], 1),
        ]
        for (args, code) in (reads ? readers : []) + writers {
            let r = try Qimg.run(args, cwd: dir)
            expectCleanFailure("qimg \(args.joined(separator: " "))", r, exitCode: code)
            #expect(r.err.contains(what), "\(args): \(r.err)")
        }
        #expect(!FileManager.default.fileExists(atPath: dir + "/out.qcow2"))
        #expect(try files.map { try FileState(dir + "/" + $0) } == before, "a refused command changed a file")
    }

    /// Item 13: info, map and check of an encrypted image (no key needed) match qemu-img's
    /// (map and check with the key: qemu-img opens nothing without it); data is refused.
    @Test(.requiresQEMU, arguments: encryptedCases)
    func encryptedImageMetadata(_ c: EncryptedCase) throws {
        let dir = try Paths.newScratch("encrypted")
        let opts = "encrypt.format=\(c.format),encrypt.key-secret=sec0" + (c.format == "luks" ? ",encrypt.iter-time=10" : "")
            + (c.options.isEmpty ? "" : "," + c.options)
        try Runner.qemuImgKeySetup(["create", "-q", "-f", "qcow2", "-o", opts] + Self.secret + ["e.qcow2", "1M"], in: dir)
        let keyed = Self.secret + ["--image-opts", "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=sec0"]
        try Runner.qemuStep(["qemu-io"] + keyed + ["-c", "write -P 0x33 64k 128k", "-c", "write -z 512k 64k"], in: dir)
        for args in [["info"], ["info", "--output=json"], ["info", "--backing-chain"]] {
            let (q, m) = try runBoth(args + ["e.qcow2"], cwd: dir)
            #expect(q.status == 0, "\(q.err)")
            expectSameExit("\(args)", qemu: q, qimg: m)
            expectSameStdout("\(args)", qemu: q, qimg: m)
        }
        for args in [["map", "--output=json"], ["map"], ["check"]] {
            let q = try Runner.qemuImg(args + keyed, cwd: dir)
            let m = try Qimg.run(args + ["e.qcow2"], cwd: dir)
            expectSameExit("\(args)", qemu: q, qimg: m)
            expectSameStdout("\(args)", qemu: q, qimg: m)
            #expect(qimgMessages(q.err) == m.err.replacingOccurrences(of: "qimg: e.qcow2: ", with: "qimg: "), "\(args)")
        }
        try Self.expectDataRefused("e.qcow2", in: dir, naming: "encrypted image", files: ["e.qcow2"], reads: true)
    }

    /// Item 13: an external data file (raw or not) is read: info, map, check, convert and
    /// compare match qemu-img; writes are refused. Its name is relative to the working
    /// directory, as in QEMU 7.2.
    @Test(.requiresQEMU, arguments: [true, false])
    func externalDataFile(_ raw: Bool) throws {
        let dir = try Paths.newScratch("data-file")
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.raw,data_file_raw=\(raw ? "on" : "off")",
                             "x.qcow2", "1M"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 0x11 64k 64k", "-c", "write -P 0x22 256k 128k", "-c", "write -z 320k 64k",
                             "x.qcow2"], in: dir)
        for args in [["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"], ["check"],
                     ["check", "--output=json"], ["compare", "x.qcow2", "d.raw"]] {
            let (q, m) = try runBoth(args + (args[0] == "compare" ? [] : ["x.qcow2"]), cwd: dir)
            // (qemu-img compare: 1 for a data file that still holds data under zero clusters)
            #expect(q.status == 0 || (args[0] == "compare" && !raw), "\(args): \(q.err)")
            expectSameExit("\(args)", qemu: q, qimg: m)
            expectSameStdout("\(args)", qemu: q, qimg: m)
        }
        try FileManager.default.createDirectory(atPath: dir + "/sub", withIntermediateDirectories: true)
        // From another directory the data file is not found: info works, map does not (for both).
        for args in [["info", "../x.qcow2"], ["map", "../x.qcow2"]] {
            let (q, m) = try runBoth(args, cwd: dir + "/sub")
            expectSameExit("\(args) from sub/", qemu: q, qimg: m)
            expectSameStdout("\(args) from sub/", qemu: q, qimg: m)
        }
        for fmt in ["qcow2", "raw"] {
            let r = try Qimg.run(["convert", "-O", fmt, "x.qcow2", "out.\(fmt)"], cwd: dir)
            #expect(r.status == 0, "convert -O \(fmt): \(r.err)")
            let cmp = try Runner.qemuImg(["compare", "x.qcow2", "out.\(fmt)"], cwd: dir)
            #expect(cmp.status == 0, "convert -O \(fmt): \(cmp.out)\(cmp.err)")
            try FileManager.default.removeItem(atPath: dir + "/out.\(fmt)")
        }
        try Self.expectDataRefused("x.qcow2", in: dir, naming: "external data file", files: ["x.qcow2", "d.raw"], reads: false)
    }
}

extension ConformanceTests {
    /// Item 14: with extended L2, convert leaves zero subclusters unallocated as qemu-img does.
    /// (Subclusters larger than -S, 2 MiB clusters: qemu-img leaves the zero parts of a
    /// written subcluster as holes of the host file, qimg writes them; see Docs/cli.md.)
    @Test(.requiresQEMU, arguments: ["64k", "16k"])
    func convertExtendedL2KeepsZeroSubclustersUnallocated(_ clusterSize: String) throws {
        let dir = try Paths.newScratch("convert-xl2")
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "4M"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 1 0 4k", "-c", "write -P 2 100k 8k", "-c", "write -P 0 300k 64k",
                             "-c", "write -P 3 1028k 36k", "src.qcow2"], in: dir)
        let opts = "extended_l2=on,cluster_size=\(clusterSize)"
        try Runner.qemuStep(["qemu-img", "convert", "-O", "qcow2", "-o", opts, "src.qcow2", "theirs.qcow2"], in: dir)
        let r = try Qimg.run(["convert", "-O", "qcow2", "-o", opts, "src.qcow2", "mine.qcow2"], cwd: dir)
        #expect(r.status == 0, "\(r.err)")
        let theirs = try Runner.qemuImg(["map", "--output=json", "theirs.qcow2"], cwd: dir)
        let mine = try Runner.qemuImg(["map", "--output=json", "mine.qcow2"], cwd: dir)
        expectSameStdout("qemu-img map of the outputs", qemu: theirs, qimg: mine)
        #expect(try Runner.qemuImg(["compare", "src.qcow2", "mine.qcow2"], cwd: dir).status == 0)
        try expectCheckClean("mine.qcow2", dir, "convert -o \(opts)")
    }

    /// Item 14: inconsistent bitmaps in qemu-img's order: the one the error names, and the
    /// warnings of --skip-broken-bitmaps (one per bitmap, qemu-img's line).
    @Test(.requiresQEMU) func convertBitmapsInconsistentOrderAndWarnings() throws {
        let dir = try Paths.newScratch("convert-broken-bitmaps")
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "bm.qcow2", "1M"], in: dir)
        for b in ["zz", "aa", "mm"] { try Runner.qemuStep(["qemu-img", "bitmap", "--add", "bm.qcow2", b], in: dir) }
        // They are left in use the way a crashed QEMU leaves them; "ok" comes after.
        _ = try Runner.qemuIO(["-c", "write 0 4k", "-c", "abort", "bm.qcow2"], cwd: dir)
        try Runner.qemuStep(["qemu-img", "bitmap", "--add", "bm.qcow2", "ok"], in: dir)
        let q = try Runner.qemuImg(["convert", "--bitmaps", "-O", "qcow2", "bm.qcow2", "theirs.qcow2"], cwd: dir)
        let m = try Qimg.run(["convert", "--bitmaps", "-O", "qcow2", "bm.qcow2", "mine.qcow2"], cwd: dir)
        #expect(q.status == 1 && q.err.contains("bitmap 'mm'"), "qemu-img: \(q.err)")
        expectCleanFailure("convert --bitmaps", m, exitCode: 1)
        #expect(m.err.contains("bitmap 'mm'"), "\(m.err)")
        let qs = try Runner.qemuImg(["convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "bm.qcow2", "theirs.qcow2"], cwd: dir)
        let ms = try Qimg.run(["convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", "bm.qcow2", "mine.qcow2"], cwd: dir)
        #expect(qs.status == 0 && ms.status == 0, "\(qs.err) \(ms.err)")
        #expect(ms.err == qimgMessages(qs.err), "qimg: \(ms.err)\nqemu-img: \(qs.err)")
        let bitmapsOf = { (f: String) throws -> String in
            let out = try Runner.qemuImg(["info", f], cwd: dir).out
            return String(out[(out.range(of: "Format specific information:")?.lowerBound ?? out.startIndex)...])
        }
        #expect(try bitmapsOf("mine.qcow2") == bitmapsOf("theirs.qcow2"))
    }
}

extension ConformanceTests {
    /// Item 14: --image-opts in its local-file forms (info, map, check, convert's source),
    /// as qemu-img reads them; anything else refused with one line naming it.
    @Test(.requiresQEMU) func imageOptsLocalFileForms() throws {
        let dir = try Paths.newScratch("image-opts")
        try Self.backingPair("base.qcow2", format: "qcow2", in: dir)
        let forms = [["info", "--image-opts", "driver=qcow2,file.filename=top.qcow2"],
                     ["info", "--output=json", "--image-opts", "file.driver=file,file.filename=top.qcow2,driver=qcow2"],
                     ["map", "--output=json", "--image-opts", "driver=qcow2,file.filename=top.qcow2"],
                     ["map", "--image-opts", "file.filename=top.qcow2"],
                     ["map", "--image-opts", "driver=raw,file.filename=base.qcow2"],
                     ["map", "--output=json", "--image-opts", "driver=file,filename=base.qcow2"],
                     ["check", "--image-opts", "driver=qcow2,file.filename=top.qcow2"],
                     ["check", "--output=json", "--image-opts", "driver=qcow2,file.filename=top.qcow2"]]
        for args in forms {
            let (q, m) = try runBoth(args, cwd: dir)
            #expect(q.status == 0, "qemu-img \(args): \(q.err)")
            expectSameExit("\(args)", qemu: q, qimg: m)
            expectSameStdout("\(args)", qemu: q, qimg: m)
        }
        let r = try Qimg.run(["convert", "--image-opts", "driver=qcow2,file.filename=top.qcow2", "-O", "qcow2", "out.qcow2"], cwd: dir)
        #expect(r.status == 0, "\(r.err)")
        #expect(try Runner.qemuImg(["compare", "top.qcow2", "out.qcow2"], cwd: dir).status == 0)
        for (args, what) in [(["map", "-f", "qcow2", "--image-opts", "driver=qcow2,file.filename=top.qcow2"], "mutually exclusive"),
                             (["map", "--image-opts", "driver=nbd,host=localhost"], "'nbd'"),
                             (["info", "--image-opts", "driver=qcow2,file.filename=top.qcow2,cache.direct=on"], "'cache.direct'")] {
            let m = try Qimg.run(args, cwd: dir)
            expectCleanFailure("\(args)", m, exitCode: 1)
            #expect(m.err.contains(what), "\(args): \(m.err)")
        }
    }
}
