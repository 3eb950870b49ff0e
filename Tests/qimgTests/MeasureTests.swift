import Foundation
import Testing
import TestSupport

/// `qimg measure` against `qemu-img measure`: the same stdout (human and JSON), the same
/// exit code, and qemu-img's error message with `qimg: ` in front (a message qemu-img
/// prints over several lines is one line). Nothing expected is written down here: every
/// figure comes from qemu-img run on the same arguments.
@Suite(.requiresQEMU) struct MeasureTests {
    /// Source images made with qemu-img and qemu-io, once per test process (small, sparse).
    static let images: Result<String, TestFailure> = Result { try makeImages() }.mapError { $0 as? TestFailure ?? TestFailure("\($0)") }

    /// Each image: its name and the commands that make it (run in order in one directory).
    static let recipes: [(String, [[String]])] = [
        ("sparse.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "sparse.qcow2", "64M"]]),
        ("part.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "part.qcow2", "64M"],
                        ["qemu-io", "-c", "write -P 1 1000 3000", "-c", "write -P 2 1M 64k", "-c", "write -P 3 5M 100k",
                         "-c", "write -z 8M 1M", "-c", "write -P 4 60M 4M", "part.qcow2"]]),
        ("full.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "full.qcow2", "3M"],
                        ["qemu-io", "-c", "write -P 9 0 3M", "full.qcow2"]]),
        ("comp.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "comp.qcow2", "16M"],
                        ["qemu-io", "-c", "write -c -P 5 0 1M", "-c", "write -c 4M 64k", "-c", "write -P 6 8M 64k", "comp.qcow2"]]),
        ("zstd.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", "zstd.qcow2", "8M"],
                        ["qemu-io", "-c", "write -c -P 1 0 128k", "-c", "write -c -P 2 3M 64k", "zstd.qcow2"]]),
        ("base.raw", [["qemu-img", "create", "-q", "-f", "raw", "base.raw", "32M"],
                      ["qemu-io", "-f", "raw", "-c", "write -P 7 0 1M", "-c", "write -P 8 20M 512", "base.raw"]]),
        ("mid.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2"],
                       ["qemu-io", "-c", "write -P 10 2M 1M", "-c", "write -z 0 64k", "mid.qcow2"]]),
        ("top.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "48M"],
                       ["qemu-io", "-c", "write -P 11 30M 64k", "-c", "write -P 12 40M 1", "-c", "write -z 20M 64k", "top.qcow2"]]),
        ("xl2.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "xl2.qcow2", "16M"],
                       ["qemu-io", "-c", "write -P 1 0 2k", "-c", "write -P 2 100k 4k", "-c", "write -z 1M 64k", "xl2.qcow2"]]),
        ("xl2top.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "base.raw", "-F", "raw", "xl2top.qcow2"],
                          ["qemu-io", "-c", "write -P 1 4k 2k", "-c", "write -z 0 2k", "xl2top.qcow2"]]),
        ("bitmaps.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "bitmaps.qcow2", "100M"],
                           ["qemu-io", "-c", "write -P 1 0 64k", "bitmaps.qcow2"],
                           ["qemu-img", "bitmap", "--add", "bitmaps.qcow2", "a"],
                           ["qemu-img", "bitmap", "--add", "-g", "512", "bitmaps.qcow2", "fine-grained-bitmap-with-a-long-name"],
                           ["qemu-img", "bitmap", "--add", "-g", "2M", "bitmaps.qcow2", "c"],
                           ["qemu-img", "bitmap", "--add", "-g", "1M", "--disable", "bitmaps.qcow2", "disabled"]]),
        ("bitmap-odd.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "bitmap-odd.qcow2", "3000001"],
                              ["qemu-img", "bitmap", "--add", "-g", "4k", "bitmap-odd.qcow2", "b"]]),
        // Twelve directory entries of 40 bytes: one 512-byte cluster of directory, just.
        ("many-bitmaps.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "many-bitmaps.qcow2", "5M"]]
            + (1...12).map { ["qemu-img", "bitmap", "--add", "-g", "\(512 << ($0 % 8))", "many-bitmaps.qcow2", "bitmap-\($0 < 10 ? "0" : "")\($0)"] }),
        ("v2.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "10M"],
                      ["qemu-io", "-c", "write 0 100k", "v2.qcow2"]]),
        ("prealloc-metadata.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "prealloc-metadata.qcow2", "8M"],
                                     ["qemu-io", "-c", "write -P 3 1M 64k", "prealloc-metadata.qcow2"]]),
        ("prealloc-full.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", "prealloc-full.qcow2", "4M"]]),
        ("discard.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "discard.qcow2", "8M"],
                           ["qemu-io", "-c", "write -P 1 0 4M", "-c", "discard 1M 2M", "discard.qcow2"]]),
        ("small.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=1", "small.qcow2", "2M"],
                         ["qemu-io", "-c", "write -P 1 513 1000", "-c", "discard 0 512", "small.qcow2"]]),
        ("odd.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "odd.qcow2", "1000000"],
                       ["qemu-io", "-c", "write -P 1 999000 1000", "odd.qcow2"]]),
        ("big.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "big.qcow2", "1T"],
                       ["qemu-io", "-c", "write -P 1 100G 1M", "-c", "write -P 1 1023G 3M", "big.qcow2"]]),
        ("snap.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "snap.qcow2", "16M"],
                        ["qemu-io", "-c", "write -P 1 0 1M", "snap.qcow2"],
                        ["qemu-img", "snapshot", "-c", "s1", "snap.qcow2"],
                        ["qemu-io", "-c", "write -P 2 4M 3M", "-c", "discard 0 512k", "snap.qcow2"],
                        ["qemu-img", "resize", "-q", "snap.qcow2", "40M"],
                        ["qemu-img", "bitmap", "--add", "snap.qcow2", "bm"],
                        ["qemu-img", "snapshot", "-c", "s2", "snap.qcow2"]]),
        ("sparse.raw", [["qemu-img", "create", "-q", "-f", "raw", "sparse.raw", "10M"]]),
        ("odd.raw", [["qemu-img", "create", "-q", "-f", "raw", "odd.raw", "1000"], ["qemu-io", "-f", "raw", "-c", "write -P 1 0 1000", "odd.raw"]]),
        ("full.raw", [["qemu-img", "create", "-q", "-f", "raw", "full.raw", "1M"], ["qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", "full.raw"]]),
    ]

    static func makeImages() throws -> String {
        guard Env.qemuAvailable else { throw TestFailure(Env.missingQEMUMessage) }
        let dir = try Paths.newScratch("measure")
        for (_, steps) in recipes {
            for step in steps { try Runner.qemuStep(step, in: dir) }
        }
        // A bitmap marked in use (as after a crash): QEMU still counts it.
        try FileManager.default.copyItem(atPath: dir + "/bitmaps.qcow2", toPath: dir + "/inuse.qcow2")
        try markFirstBitmapInUse(dir + "/inuse.qcow2")
        return dir
    }

    /// Sets the in-use flag of the first bitmap directory entry (found through the header extension).
    static func markFirstBitmapInUse(_ path: String) throws {
        let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        defer { try? h.close() }
        let header = [UInt8](try h.read(upToCount: 65536) ?? Data())
        func u32(_ o: Int) -> UInt32 { header[o..<o + 4].reduce(0) { $0 << 8 | UInt32($1) } }
        func u64(_ o: Int) -> UInt64 { header[o..<o + 8].reduce(0) { $0 << 8 | UInt64($1) } }
        var pos = Int(u32(100))
        while pos + 8 <= header.count, u32(pos) != 0 {
            if u32(pos) == 0x2385_2875 {
                let entry = u64(pos + 24)  // bitmap directory offset
                try h.seek(toOffset: entry + 12)
                let flags = [UInt8](try h.read(upToCount: 4) ?? Data())
                try h.seek(toOffset: entry + 12)
                h.write(Data([flags[0], flags[1], flags[2], flags[3] | 1]))
                return
            }
            pos += 8 + (Int(u32(pos + 4)) + 7) & ~7
        }
        throw TestFailure("\(path): no bitmaps extension")
    }

    static var imageNames: [String] { recipes.map(\.0) + ["inuse.qcow2"] }

    /// qemu-img's stderr as qimg prints it: one line, `qimg: ` and the message's lines joined.
    static func expectedStderr(_ q: RunResult) -> [String] {
        let lines = q.stderrLines.map { $0.hasPrefix("qemu-img: ") ? String($0.dropFirst(10)) : $0 }
        return lines.isEmpty ? [] : ["qimg: " + lines.joined(separator: " ")]
    }

    /// Runs `measure ARGS` through both tools in `dir` and compares everything.
    static func compare(_ args: [String], in dir: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let q = try Runner.qemuImg(["measure"] + args, cwd: dir, timeout: 30)
        let m = try Qimg.run(["measure"] + args, cwd: dir)
        let label = "measure " + args.joined(separator: " ")
        expectSameExit(label, qemu: q, qimg: m, sourceLocation: sourceLocation)
        expectSameStdout(label, qemu: q, qimg: m, sourceLocation: sourceLocation)
        #expect(m.stderrLines == expectedStderr(q), "\(label): stderr", sourceLocation: sourceLocation)
    }

    // MARK: - --size

    struct SizeCase: Sendable, CustomTestStringConvertible {
        var args: [String]
        var testDescription: String { args.joined(separator: " ") }
    }

    /// Sizes × cluster sizes × extended L2 (qcow2), the preallocation modes rotating over
    /// them (each mode meets every cluster size and L2 kind across the sizes), and raw;
    /// human and JSON alternate.
    static let sizeCases: [SizeCase] = {
        let sizes = ["0", "1", "65537", "1000000", "1T", "16T"]
        let modes = ["off", "metadata", "falloc", "full"]
        var out: [SizeCase] = []
        var n = 0
        for (i, s) in sizes.enumerated() {
            out.append(SizeCase(args: ["--size", s]))
            out.append(SizeCase(args: ["--output=json", "-O", "raw", "--size", s, "-o", "preallocation=full"]))
            for cs in ["512", "64k", "2M"] {
                for xl2 in ["off", "on"] {
                    n += 1
                    let output = n % 2 == 0 ? "json" : "human"
                    out.append(SizeCase(args: ["--output=\(output)", "-O", "qcow2", "-o",
                                               "cluster_size=\(cs),extended_l2=\(xl2),preallocation=\(modes[(n + i) % 4])", "--size", s]))
                }
            }
        }
        // Refcount widths and compat change the refcount blocks.
        for o in ["refcount_bits=1", "refcount_bits=64,cluster_size=512", "compat=0.10", "refcount_bits=8,cluster_size=2M"] {
            out.append(SizeCase(args: ["-O", "qcow2", "-o", o, "--size", "100G"]))
            out.append(SizeCase(args: ["--output=json", "-O", "qcow2", "-o", o, "--size", "3333333"]))
        }
        return out
    }()

    @Test(arguments: sizeCases)
    func sizeMatchesQemuImg(_ c: SizeCase) throws {
        let dir = try Paths.newScratch("measure-size")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.compare(c.args, in: dir)
    }

    // MARK: - Existing images

    static let targets: [[String]] = [
        ["-O", "raw"],
        ["-O", "qcow2"],
        ["-O", "qcow2", "-o", "cluster_size=512"],
        ["-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=1"],
        ["-O", "qcow2", "-o", "extended_l2=on"],
        ["-O", "qcow2", "-o", "preallocation=metadata,cluster_size=16k"],
        ["-O", "qcow2", "-o", "preallocation=falloc"],
        ["-O", "qcow2", "-o", "backing_file=elsewhere.qcow2"],
        ["-O", "qcow2", "-o", "compat=0.10"],
        ["-O", "qcow2", "-o", "refcount_bits=64,lazy_refcounts=on,compression_type=zstd"],
    ]

    struct ImageCase: Sendable, CustomTestStringConvertible {
        var args: [String]
        var testDescription: String { args.joined(separator: " ") }
    }

    /// Every image into the default qcow2 and into two other targets (rotating over the list),
    /// human and JSON alternating.
    static let imageCases: [ImageCase] = {
        var out: [ImageCase] = []
        for (i, image) in imageNames.enumerated() {
            for (k, t) in [targets[1], targets[(2 * i) % targets.count], targets[(2 * i + 1) % targets.count]].enumerated() {
                out.append(ImageCase(args: ((i + k) % 2 == 0 ? [] : ["--output=json"]) + t + [image]))
            }
        }
        return out
    }()

    @Test(arguments: imageCases)
    func imageMatchesQemuImg(_ c: ImageCase) throws {
        try Self.compare(c.args, in: try Self.images.get())
    }

    /// -f, -U and -l (internal snapshots: by ID, by name, by both fields; missing ones).
    @Test(arguments: [
        ["-O", "qcow2", "-l", "s1", "snap.qcow2"], ["--output=json", "-O", "qcow2", "-l", "1", "snap.qcow2"],
        ["-O", "qcow2", "-l", "s2", "snap.qcow2"], ["-l", "snapshot.id=1", "snap.qcow2"],
        ["-O", "qcow2", "-l", "snapshot.name=s1", "snap.qcow2"], ["-O", "qcow2", "-l", "snapshot.id=2,snapshot.name=s2", "snap.qcow2"],
        ["-O", "qcow2", "-l", "snapshot.id=1,snapshot.name=s2", "snap.qcow2"], ["-l", "nope", "snap.qcow2"],
        ["-l", "", "snap.qcow2"], ["-l", "snapshot.id=", "snap.qcow2"], ["-l", "snapshot.foo=1", "snap.qcow2"],
        ["-l", "s1", "sparse.raw"], ["-f", "raw", "-l", "s1", "snap.qcow2"],
        ["-f", "raw", "-O", "qcow2", "part.qcow2"], ["-f", "qcow2", "-O", "qcow2", "top.qcow2"],
        ["-U", "--output=json", "-O", "qcow2", "bitmaps.qcow2"], ["-O", "qcow2", "-o", "cluster_size=512", "bitmaps.qcow2"],
        ["-O", "qcow2", "-o", "cluster_size=512", "many-bitmaps.qcow2"], ["-O", "qcow2", "-o", "cluster_size=1k", "many-bitmaps.qcow2"],
        ["--output=json", "-O", "qcow2", "-o", "cluster_size=512", "inuse.qcow2"],
    ])
    func optionsOnImagesMatchQemuImg(_ args: [String]) throws {
        try Self.compare(args, in: try Self.images.get())
    }

    // MARK: - Errors

    static let errorCases: [[String]] = [
        [], ["-O", "qcow2"], ["--size", "1G", "part.qcow2"], ["part.qcow2", "sparse.raw"],
        ["-f", "qcow2", "--size", "1G"], ["-l", "s1", "--size", "1G"],
        ["--output=xml", "--size", "1G"], ["--output", "JSON", "part.qcow2"],
        ["--size", "abc"], ["--size", "-1"], ["--size", "8E"], ["--size", "16E"], ["--size", "99999999999999999999"],
        ["--size", "1.5G"], ["--size", "0x10000"], ["--size", "1P", "-O", "qcow2"],
        ["-O", "foo", "--size", "1G"], ["-O", "vmdk", "--size", "1G"], ["-O", "file", "--size", "1G"],
        ["-O", "dmg", "--size", "1G"], ["-O", "luks", "--size", "1G"], ["-O", "luks", "-o", "key-secret=sec0", "--size", "1G"],
        ["-O", "QCOW2", "--size", "1G"], ["-O", "foo", "part.qcow2"],
        ["-O", "qcow2", "-o", "cluster_size=512", "--size", "1T"],
        ["-O", "qcow2", "-o", "cluster_size=512,size=1T", "part.qcow2"],
        ["-O", "qcow2", "-o", "cluster_size=2M", "--size", "2049P"],
        ["-O", "qcow2", "-o", "cluster_size=2M,extended_l2=on", "--size", "1025P"],
        ["-O", "qcow2", "-o", "help", "--size", "1G"], ["-O", "raw", "-o", "?", "--size", "1G"],
        ["-O", "qcow2", "-o", "foo=1,help", "--size", "1G"],
        ["-O", "qcow2", "-o", "", "--size", "1G"], ["-O", "qcow2", "-o", ",", "--size", "1G"],
        ["-O", "qcow2", "-o", "size=5M,", "--size", "1G"], ["-O", "qcow2", "-o", "size=5M", "-O", "qcow2"],
        ["-O", "raw", "-o", "cluster_size=64k", "--size", "1G"], ["-O", "raw", "-o", "preallocation=bogus,nocow=on", "--size", "1G"],
        ["-O", "qcow2", "-o", "cluster_size=4M", "--size", "1G"], ["-O", "qcow2", "-o", "cluster_size=1000", "--size", "1G"],
        ["-O", "qcow2", "-o", "cluster_size=abc", "--size", "1G"], ["-O", "qcow2", "-o", "cluster_size=0", "part.qcow2"],
        ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=8k", "--size", "1G"], ["-O", "qcow2", "-o", "extended_l2=maybe", "--size", "1G"],
        ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=4k,compat=foo", "--size", "1G"],
        ["-O", "qcow2", "-o", "compat=v3", "--size", "1G"], ["-O", "qcow2", "-o", "compat=0.10,extended_l2=on", "--size", "1G"],
        ["-O", "qcow2", "-o", "compat=0.10,refcount_bits=8", "--size", "1G"],
        ["-O", "qcow2", "-o", "refcount_bits=3,preallocation=foo", "--size", "1G"],
        ["-O", "qcow2", "-o", "refcount_bits=128", "--size", "1G"], ["-O", "qcow2", "-o", "refcount_bits=0", "--size", "1G"],
        ["-O", "qcow2", "-o", "refcount_bits=-1", "--size", "1G"], ["-O", "qcow2", "-o", "refcount_bits=abc", "--size", "1G"],
        ["-O", "qcow2", "-o", "refcount_bits=0x20", "--size", "1G"], ["-O", "qcow2", "-o", "refcount_bits=010", "--size", "1G"],
        ["-O", "qcow2", "-o", "refcount_bits=18446744073709551616", "--size", "1G"],
        ["-O", "qcow2", "-o", "preallocation=foo", "--size", "1G"], ["-O", "qcow2", "-o", "lazy_refcounts=x,refcount_bits=abc", "--size", "1G"],
        ["-O", "qcow2", "-o", "nocow=x", "--size", "1G"], ["-O", "qcow2", "-o", "size=x", "--size", "1G"],
        ["-O", "qcow2", "-o", "encrypt.iter-time=x", "--size", "1G"], ["-O", "qcow2", "-o", "foo=bar", "part.qcow2"],
        ["-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"], ["-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=s0", "--size", "1G"],
        ["-O", "qcow2", "-o", "encrypt.format=aes,encryption=on,data_file=d,data_file_raw=on,compression_type=foo", "--size", "1G"],
        ["-O", "qcow2", "-o", "backing_file=b,backing_fmt=qcow2,extent_size_hint=1M,nocow=on", "--size", "1G"],
        ["-O", "qcow2", "-o", "cluster_size=512", "-o", "cluster_size=2M", "--size", "1G"],
    ]

    @Test(arguments: errorCases)
    func usageMatchesQemuImg(_ args: [String]) throws {
        try Self.compare(args, in: try Self.images.get())
    }

    /// An image that cannot be opened: qimg words the reason its own way (as its other commands do).
    @Test(arguments: [["missing.qcow2"], ["-O", "foo", "missing.qcow2"], ["-f", "qcow2", "sparse.raw"], ["-f", "vmdk", "part.qcow2"]])
    func unopenableImageFailsLikeQemuImg(_ args: [String]) throws {
        let dir = try Self.images.get()
        let q = try Runner.qemuImg(["measure"] + args, cwd: dir)
        let m = try Qimg.run(["measure"] + args, cwd: dir)
        #expect(q.status == 1, "qemu-img: \(q.err)")
        expectCleanFailure("measure " + args.joined(separator: " "), m, exitCode: q.status)
        #expect(m.out.isEmpty)
    }

    // MARK: - The fixtures of the other suites

    /// Every valid fixture, into qcow2 (JSON) or raw (human), alternately.
    @Test func fixturesMatchQemuImg() throws {
        let f = try Fixtures.get()
        for (i, e) in f.manifest.enumerated() {
            try Self.compare(i % 2 == 0 ? ["--output=json", "-O", "qcow2", e.name] : ["-O", "raw", "-f", e.format, e.name],
                             in: f.validDir)
        }
    }

    /// Crafted images: one error line or a result, never a crash or a hang; where qemu-img
    /// refuses the image, qimg refuses it too.
    @Test(arguments: try Fixtures.malformedArguments())
    func malformedImageFailsCleanly(_ e: MalformedEntry) throws {
        let f = try Fixtures.get()
        let args = ["measure"] + e.formatArgs + ["-O", "qcow2", e.name]
        let m = try Qimg.run(args, cwd: f.malformedDir, timeout: 5)
        let label = "\(e.name) (\(e.description)): \(m.command)"
        #expect(m.exitedNormally, "\(label): \(m.summary)")
        guard m.exitedNormally else { return }
        if m.status != 0 || e.qemuInfoExit != 0 {
            expectCleanFailure(label, m, exitCode: 1)
        }
    }
}
