import Foundation
import Testing
import TestSupport

/// `qimg convert` against `qemu-img convert` on the same inputs.
@Suite struct ConvertTests {
    static let cases: [(String, [String])] = [
        ("c64k.qcow2", ["-O", "raw"]), ("zlib.qcow2", ["-O", "qcow2"]), ("xl2-top.qcow2", ["-O", "qcow2"]),
        ("rel/top.qcow2", ["-O", "qcow2", "-o", "cluster_size=4k"]), ("snap.qcow2", ["-O", "raw"]),
        ("short-top.qcow2", ["-O", "qcow2", "-c"]), ("c512.qcow2", ["-O", "qcow2", "-c", "-o", "compression_type=zstd"]),
        ("plain.raw", ["-O", "qcow2", "-o", "compat=0.10"]), ("zero.qcow2", ["-O", "raw"]),
    ]

    @Test(.requiresQEMU, arguments: 0..<cases.count)
    func convertMatchesQemuImg(_ i: Int) throws {
        let (name, args) = Self.cases[i]
        let f = try Fixtures.get()
        let dir = try Paths.newScratch("convert")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let src = f.validDir + "/" + name
        let q = try Runner.qemuImg(["convert"] + args + [src, dir + "/q.img"])
        let m = try Qimg.run(["convert"] + args + [src, dir + "/m.img"], cwd: dir)
        #expect(q.status == 0 && m.status == 0, "\(name) \(args): \(m.err)")
        let cmp = try Runner.qemuImg(["compare", dir + "/q.img", dir + "/m.img"])
        #expect(cmp.status == 0, "\(name) \(args): \(cmp.out)")
        let same = try Runner.qemuImg(["compare", src, dir + "/m.img"])
        #expect(same.status == 0, "\(name) \(args): \(same.out)")
        if args.contains("qcow2") {
            try expectCheckClean("m.img", dir, "\(name) \(args)")
            // The same guest map modulo host offsets: zero ranges stayed sparse.
            func flags(_ s: String) -> [String] {
                s.split(separator: "\n").compactMap { $0.contains("\"data\": true") ? String($0.split(separator: ",")[0]) : nil }
            }
            let qm = try Runner.qemuImg(["map", "--output=json", dir + "/q.img"]).out
            let mm = try Runner.qemuImg(["map", "--output=json", dir + "/m.img"]).out
            #expect(flags(mm).count <= flags(qm).count + 2, "\(name): qimg allocated more extents than qemu-img\n\(mm)\n\(qm)")
        }
    }

    /// The target appears only complete: written as TARGET.qimg-tmp, renamed when done;
    /// an existing target's mode carries over; a symlink keeps pointing at the file it
    /// named; `-t unsafe` gives the same image; a bad -t value is one error line.
    @Test(.requiresQEMU) func targetReplacedWhole() throws {
        let dir = try Paths.newScratch("convert-target")
        try FileManager.default.createDirectory(atPath: dir + "/real", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try Runner.qemuImg(["create", "-q", "-f", "qcow2", "s.qcow2", "8M"], cwd: dir)
        _ = try Runner.qemuIO(["-c", "write -P 7 0 3M", "s.qcow2"], cwd: dir)
        _ = try Runner.qemuImg(["create", "-q", "-f", "qcow2", "real/t.qcow2", "1M"], cwd: dir)
        #expect(chmod(dir + "/real/t.qcow2", 0o600) == 0)
        #expect(symlink("real/t.qcow2", dir + "/link.qcow2") == 0)
        for (target, extra) in [("link.qcow2", [String]()), ("u.qcow2", ["-t", "unsafe"])] {
            let m = try Qimg.run(["convert", "-O", "qcow2"] + extra + ["s.qcow2", target], cwd: dir)
            #expect(m.status == 0, "\(target): \(m.err)")
            #expect(try Runner.qemuImg(["compare", "s.qcow2", target], cwd: dir).status == 0, "\(target)")
            #expect(!FileManager.default.fileExists(atPath: dir + "/" + target + ".qimg-tmp"))
        }
        let link = try FileManager.default.destinationOfSymbolicLink(atPath: dir + "/link.qcow2")
        #expect(link == "real/t.qcow2", "the symlink was replaced")
        let mode = try FileManager.default.attributesOfItem(atPath: dir + "/real/t.qcow2")[.posixPermissions] as? Int
        #expect(mode == 0o600, "mode \(String(mode ?? 0, radix: 8))")
        let bad = try Qimg.run(["convert", "-t", "bogus", "-O", "qcow2", "s.qcow2", "b.qcow2"], cwd: dir)
        #expect(bad.status == 1 && bad.err == "qimg: Invalid cache option: bogus\n", "\(bad.err)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/b.qcow2"))
    }

    /// `convert -n` into an existing raw file: the source's zero ranges (a zero cluster and
    /// unallocated space) are written as zeros, so none of the target's old bytes show
    /// through (the path of CopyEngine's zero writes to raw targets).
    @Test(.requiresQEMU) func existingRawTargetGetsZeros() throws {
        let dir = try Paths.newScratch("convert-n-raw")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "4M"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -z 1M 1M", "s.qcow2"], in: dir)
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "raw", "t.raw", "4M"], in: dir)
        try Runner.qemuStep(["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 4M", "t.raw"], in: dir)
        let m = try Qimg.run(["convert", "-n", "-O", "raw", "s.qcow2", "t.raw"], cwd: dir)
        #expect(m.status == 0, "\(m.summary): \(m.err)")
        let cmp = try Runner.qemuImg(["compare", "-f", "qcow2", "-F", "raw", "s.qcow2", "t.raw"], cwd: dir)
        #expect(cmp.status == 0, "\(cmp.out)\(cmp.err)")
    }

    @Test(.requiresQEMU) func bitmapsAreCopied() throws {
        let dir = try Paths.newScratch("convert-bitmaps")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for args in [["create", "-q", "-f", "qcow2", "s.qcow2", "32M"], ["bitmap", "--add", "s.qcow2", "on"],
                     ["bitmap", "--add", "-g", "512", "s.qcow2", "fine"]] {
            _ = try Runner.qemuImg(args, cwd: dir)
        }
        _ = try Runner.qemuIO(["-c", "write -P 1 0 100k", "-c", "write -z 5M 64k", "s.qcow2"], cwd: dir)
        _ = try Runner.qemuImg(["bitmap", "--disable", "s.qcow2", "fine"], cwd: dir)
        _ = try Runner.qemuImg(["convert", "-O", "qcow2", "--bitmaps", "s.qcow2", "q.qcow2"], cwd: dir)
        let m = try Qimg.run(["convert", "-O", "qcow2", "--bitmaps", "s.qcow2", "m.qcow2"], cwd: dir)
        #expect(m.status == 0, "\(m.err)")
        func bitmapsInfo(_ f: String) throws -> String {
            try Runner.qemuImg(["info", "--output=json", f], cwd: dir).out.split(separator: "\n")
                .filter { !$0.contains("filename") && !$0.contains("actual-size") }.joined(separator: "\n")
        }
        #expect(try bitmapsInfo("m.qcow2") == (try bitmapsInfo("q.qcow2")))
        for b in ["on", "fine"] {
            #expect(try BitmapTests.qemuExtents("m.qcow2", b, dir) == (try BitmapTests.qemuExtents("q.qcow2", b, dir)), "bitmap \(b)")
        }
        // An inconsistent bitmap stops --bitmaps unless --skip-broken-bitmaps.
        _ = try Runner.qemuIO(["-c", "write 0 4k", "-c", "abort", "s.qcow2"], cwd: dir)
        let bad = try Qimg.run(["convert", "-O", "qcow2", "--bitmaps", "s.qcow2", "x.qcow2"], cwd: dir)
        #expect(bad.status == 1 && bad.err.contains("inconsistent") && !FileManager.default.fileExists(atPath: dir + "/x.qcow2"))
        let skip = try Qimg.run(["convert", "-O", "qcow2", "--bitmaps", "--skip-broken-bitmaps", "s.qcow2", "y.qcow2"], cwd: dir)
        #expect(skip.status == 0, "\(skip.err)")
    }

    /// -o as qemu-img takes it (issue 13, item 10): refused with -n; backing_file,
    /// backing_fmt, encryption=off and size accepted for qcow2, -B/-F winning over them;
    /// the errors qemu-img reports, with its wording. Same exit code, same messages, the
    /// same image (or none), and an -n target left as it was.
    @Test(.requiresQEMU) func createOptionsMatchQemuImg() throws {
        let dir = try Paths.newScratch("convert-options")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for args in [["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M"], ["qemu-io", "-c", "write -P 1 0 2M", "base.qcow2"],
                     ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "s.qcow2"],
                     ["qemu-io", "-c", "write -P 2 1M 64k", "s.qcow2"], ["qemu-img", "create", "-q", "-f", "qcow2", "n.qcow2", "4M"]] {
            try Runner.qemuStep(args, in: dir)
        }
        let cases: [[String]] = [
            ["-n", "-o", "preallocation=metadata"], ["-n", "-O", "qcow2", "-o", "preallocation=metadata"],
            ["-n", "-O", "qcow2", "-o", "cluster_size=4k"], ["-n", "-O", "qcow2", "-o", "help"], ["-n", "-O", "qcow2", "-o", "bogus=1"],
            ["-O", "qcow2", "-o", "backing_fmt=qcow2"], ["-O", "qcow2", "-o", "backing_fmt=raw"], ["-O", "qcow2", "-F", "qcow2"],
            ["-O", "qcow2", "-o", "backing_file=base.qcow2"], ["-O", "qcow2", "-B", "base.qcow2"],
            ["-O", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2"], ["-O", "qcow2", "-B", "base.qcow2", "-o", "backing_fmt=qcow2"],
            ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "-o", "backing_fmt=raw"],
            ["-O", "qcow2", "-o", "backing_fmt=bogus,backing_file=base.qcow2"], ["-O", "raw", "-o", "backing_fmt=qcow2"],
            ["-O", "qcow2", "-o", "encryption=off"], ["-O", "qcow2", "-o", "encryption=off,compat=0.10"], ["-O", "qcow2", "-o", "encryption=on"],
            ["-O", "qcow2", "-o", "encryption=yes"], ["-O", "qcow2", "-o", "encryption=OFF"], ["-O", "raw", "-o", "encryption=off"],
            ["-O", "qcow2", "-o", "size=1M"], ["-O", "qcow2", "-o", "bogus=1"], ["-O", "raw", "-o", "bogus=1"],
            ["-O", "qcow2", "-o", "compat=bad"], ["-O", "qcow2", "-o", "preallocation=bad"], ["-O", "raw", "-o", "preallocation=bad"],
        ]
        let fm = FileManager.default
        for c in cases {
            let label = "convert \(c.joined(separator: " "))"
            let skip = c.contains("-n")
            let (qt, mt) = skip ? ("nref.img", "nnew.img") : ("ref.img", "new.img")
            for t in [qt, mt] {
                try? fm.removeItem(atPath: dir + "/" + t)
                if skip { try fm.copyItem(atPath: dir + "/n.qcow2", toPath: dir + "/" + t) }
            }
            let before = try Data(contentsOf: URL(fileURLWithPath: dir + "/n.qcow2"))
            let q = try Runner.qemuImg(["convert"] + c + ["s.qcow2", qt], cwd: dir)
            let m = try Qimg.run(["convert"] + c + ["s.qcow2", mt], cwd: dir)
            expectSameExit(label, qemu: q, qimg: m)
            #expect(m.err == qimgMessages(q.err.replacingOccurrences(of: "ref.img", with: "new.img")),
                    "\(label): stderr\nqemu-img: \(q.err)\nqimg:     \(m.err)")
            if skip {
                #expect(try Data(contentsOf: URL(fileURLWithPath: dir + "/" + mt)) == before, "\(label): the -n target was changed")
            } else if q.status != 0 {
                #expect(!fm.fileExists(atPath: dir + "/" + mt), "\(label): a failed convert left its target")
            } else {
                #expect(try CreateTests.info(mt, cwd: dir) == (try CreateTests.info(qt, cwd: dir)), "\(label)")
                #expect(try Runner.qemuImg(["compare", qt, mt], cwd: dir).status == 0, "\(label): contents differ")
            }
        }
    }

    /// `qemu-img map --output=json` of `file` without host offsets (they depend on the
    /// order of allocation, not on what is allocated).
    static func guestMap(_ file: String, format: String, _ dir: String) throws -> String {
        let r = try Runner.qemuImg(["map", "-f", format, "--output=json", file], cwd: dir)
        return r.out.replacing(#/, "offset": [0-9]+/#, with: "")
    }

    /// Runs the same convert through qemu-img (to q.out) and qimg (to m.out); records an
    /// issue unless both succeed with the same allocation (guest map) and content.
    static func expectSameConversion(_ args: [String], _ src: String, format: String, _ dir: String,
                                     sourceLocation: SourceLocation = #_sourceLocation) throws {
        let label = "convert \(args.joined(separator: " ")) \(src)"
        for f in ["q.out", "m.out"] { try? FileManager.default.removeItem(atPath: dir + "/" + f) }
        let q = try Runner.qemuImg(["convert"] + args + [src, "q.out"], cwd: dir)
        let m = try Qimg.run(["convert"] + args + [src, "m.out"], cwd: dir)
        guard q.status == 0, m.status == 0 else {
            Issue.record("\(label): qemu-img \(q.status) \(q.err), qimg \(m.status) \(m.err)", sourceLocation: sourceLocation)
            return
        }
        let qm = try guestMap("q.out", format: format, dir), mm = try guestMap("m.out", format: format, dir)
        if let d = Diff.firstDifference(qm, mm) {
            Issue.record("\(label): allocation differs at \(d)\nqemu-img:\n\(qm)\nqimg:\n\(mm)", sourceLocation: sourceLocation)
        }
        let cmp = try Runner.qemuImg(["compare", "-f", format, "-F", format, "q.out", "m.out"], cwd: dir)
        if cmp.status != 0 { Issue.record("\(label): content differs: \(cmp.out)", sourceLocation: sourceLocation) }
        if format == "qcow2" {
            let check = try Runner.qemuImg(["check", "m.out"], cwd: dir)
            if check.status != 0 { Issue.record("\(label): qemu-img check: \(check.out)\(check.err)", sourceLocation: sourceLocation) }
        }
    }

    /// -B (issue 13, item 3): the new overlay holds what the source's top layer holds (its
    /// data, its zeros as zero clusters), not everything that differs from zero; a standalone
    /// source gives its data and, up to the end of BACKING, its zeros as zero clusters.
    /// Same allocation as qemu-img's output, same content.
    @Test(.requiresQEMU) func backingOverlayMatchesQemuImg() throws {
        let dir = try Paths.newScratch("convert-backing")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for step in [["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "16M"], ["qemu-io", "-c", "write -P 1 0 8M", "base.qcow2"],
                     ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
                     ["qemu-io", "-c", "write -P 2 1M 64k", "top.qcow2"],
                     ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "mixed.qcow2"],
                     ["qemu-io", "-c", "write -P 2 1M 64k", "-c", "write -P 1 2M 64k", "-c", "write -z 3M 64k", "-c", "write -P 0 5M 64k",
                      "-c", "write -P 3 12M 100k", "-c", "write -z 14M 64k", "mixed.qcow2"],
                     ["qemu-img", "convert", "-O", "qcow2", "mixed.qcow2", "flat.qcow2"],
                     ["qemu-img", "convert", "-O", "raw", "mixed.qcow2", "flat.raw"],
                     ["qemu-img", "create", "-q", "-f", "qcow2", "small.qcow2", "4M"], ["qemu-io", "-c", "write -P 4 0 3M", "small.qcow2"],
                     ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "small.qcow2", "-F", "qcow2", "long.qcow2", "9M"],
                     ["qemu-io", "-c", "write -P 5 1M 64k", "-c", "write -P 5 6M 64k", "-c", "write -z 7M 64k", "long.qcow2"]] {
            try Runner.qemuStep(step, in: dir)
        }
        // The issue's case: 8 MiB in the base, 64 KiB in the overlay.
        try Self.expectSameConversion(["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"], "top.qcow2", format: "qcow2", dir)
        let mine = try Self.guestMap("m.out", format: "qcow2", dir)
        #expect(mine.split(separator: "\n").filter { $0.contains("\"depth\": 0") && $0.contains("\"data\": true") }.count == 1, "\(mine)")
        for (src, args) in [("mixed.qcow2", [String]()), ("mixed.qcow2", ["-o", "cluster_size=4k"]), ("mixed.qcow2", ["-c"]),
                            ("mixed.qcow2", ["-o", "compat=0.10"]), ("flat.qcow2", []), ("flat.raw", []), ("flat.qcow2", ["-o", "cluster_size=512"]),
                            ("long.qcow2", ["-B", "small.qcow2"]), ("flat.qcow2", ["-B", "small.qcow2"])] {
            let b = args.contains("-B") ? [] : ["-B", "base.qcow2"]
            try Self.expectSameConversion(["-O", "qcow2"] + b + ["-F", "qcow2"] + args, src, format: "qcow2", dir)
            #expect(try Runner.qemuImg(["compare", src, "m.out"], cwd: dir).status == 0, "\(src) \(args)")
        }
        // Where qemu-img would lose data, qimg does not: -B naming a lower layer of the
        // source's chain (qemu-img assumes the layers in between hold nothing).
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mixed.qcow2", "-F", "qcow2", "upper.qcow2"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 6 4M 64k", "upper.qcow2"], in: dir)
        let m = try Qimg.run(["convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", "upper.qcow2", "lower.qcow2"], cwd: dir)
        #expect(m.status == 0, "\(m.err)")
        let same = try Runner.qemuImg(["compare", "upper.qcow2", "lower.qcow2"], cwd: dir)
        #expect(same.status == 0, "\(same.out)")
    }

    /// -S (issue 13, item 4): 0 writes every byte (the whole disk), other sizes leave out
    /// the zero runs qemu-img leaves out (aligned pieces of S, whole clusters of a qcow2
    /// target), for qcow2 targets of several cluster sizes, compressed ones and raw.
    @Test(.requiresQEMU, arguments: ["0", "4k", "8k", "64k"])
    func sparseSizeMatchesQemuImg(_ size: String) throws {
        let dir = try Paths.newScratch("convert-sparse")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "4M"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 1 0 256k", "-c", "write -P 0 16k 4k", "-c", "write -P 0 64k 8k", "-c", "write -P 0 132k 8k",
                             "-c", "write -P 0 192k 32k", "-c", "write -P 0 512k 64k", "-c", "write -z 1M 64k", "-c", "write -P 0 1536k 2k",
                             "-c", "write -P 3 2M 1k", "-c", "write -P 4 3M 4k", "-c", "write -P 4 3080k 4k", "s.qcow2"], in: dir)
        try Runner.qemuStep(["qemu-img", "convert", "-O", "raw", "s.qcow2", "s.raw"], in: dir)
        for (src, fmt) in [("s.qcow2", "qcow2"), ("s.raw", "raw")] {
            for args in [["-O", "qcow2"], ["-O", "qcow2", "-o", "cluster_size=4k"], ["-O", "qcow2", "-o", "cluster_size=512"],
                         ["-O", "qcow2", "-c"], ["-O", "raw"]] {
                try Self.expectSameConversion(["-f", fmt, "-S", size] + args, src, format: args[1], dir)
            }
        }
    }

    /// -c (issue 13, item 5): the file ends where qemu-img's does, on a whole sector after
    /// the last compressed cluster (the new L2 table before the data, as QEMU lays it out).
    /// With qemu-img's streams (--zlib=qemu) the length is qemu-img's to the byte; igzip's
    /// streams have other lengths, so there the file still ends on a whole sector and QEMU
    /// reads it clean and equal.
    @Test(.requiresQEMU) func compressedFileLengthMatchesQemuImg() throws {
        let dir = try Paths.newScratch("convert-compressed")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var rng = SystemRandomNumberGenerator()
        let noise = (0..<3_000_000).map { _ in UInt8.random(in: 0...255, using: &rng) }
        try Data(noise).write(to: URL(fileURLWithPath: dir + "/noise.raw"))
        var mixed: [UInt8] = []
        for i in 0..<40 { mixed += noise[(i * 700)..<(i * 700 + 700)] + [UInt8](repeating: UInt8(i), count: 65536 - 700) }
        try Data(mixed).write(to: URL(fileURLWithPath: dir + "/mixed.raw"))
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "s.qcow2", "5M"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 1 0 300k", "-c", "write -P 2 2M 64k", "-c", "write -P 3 4M 1M", "s.qcow2"], in: dir)
        func length(_ f: String) throws -> Int {
            try FileManager.default.attributesOfItem(atPath: dir + "/" + f)[.size] as? Int ?? -1
        }
        for src in ["noise.raw", "mixed.raw", "s.qcow2"] {
            for cluster in ["64k", "4k", "512", "2M"] {
                let args = ["convert", "-c", "-O", "qcow2", "-o", "cluster_size=\(cluster)", src]
                try Runner.qemuStep(["qemu-img"] + args + ["q.qcow2"], in: dir)
                let z = try Qimg.run(["convert", "-c", "--zlib=qemu"] + args.dropFirst(2) + ["m.qcow2"], cwd: dir)
                #expect(z.status == 0, "\(z.err)")
                #expect(try length("m.qcow2") == (try length("q.qcow2")), "\(src) cluster_size=\(cluster)")
                let m = try Qimg.run(args + ["m.qcow2"], cwd: dir)
                #expect(m.status == 0, "\(m.err)")
                #expect(try length("m.qcow2") % 512 == 0, "\(src) cluster_size=\(cluster)")
                let check = try Runner.qemuImg(["check", "m.qcow2"], cwd: dir)
                #expect(check.status == 0, "\(src) cluster_size=\(cluster): \(check.out)\(check.err)")
                #expect(try Runner.qemuImg(["compare", "q.qcow2", "m.qcow2"], cwd: dir).status == 0, "\(src) cluster_size=\(cluster)")
            }
        }
    }
}
