import Foundation
import Testing
import TestSupport

/// check -r, resize and amend, against qemu-img doing the same to a copy.
@Suite struct MaintenanceTests {
    static func scratch(_ name: String) throws -> String { try Paths.newScratch("\(name)") }

    static func sh(_ args: [String], _ dir: String) throws -> RunResult { try Runner.qemuStep(args, in: dir) }

    /// The lines of a check report that do not depend on where a rebuilt refcount structure went.
    static func portable(_ s: String) -> String {
        s.split(separator: "\n", omittingEmptySubsequences: false).filter { !$0.hasPrefix("Image end offset") }.joined(separator: "\n")
    }

    @Test(.requiresQEMU, arguments: try Fixtures.corruptArguments(), ["leaks", "all"])
    func repairMatchesQemuImg(_ entry: CorruptEntry, _ mode: String) throws {
        let f = try Fixtures.get()
        let dir = try Self.scratch("repair")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let fm = FileManager.default
        try fm.copyItem(atPath: f.corruptDir + "/" + entry.name, toPath: dir + "/q.qcow2")
        try fm.copyItem(atPath: f.corruptDir + "/" + entry.name, toPath: dir + "/m.qcow2")
        let q = try Runner.qemuImg(["check", "-r", mode, "q.qcow2"], cwd: dir)
        let m = try Qimg.run(["check", "-r", mode, "m.qcow2"], cwd: dir)
        #expect(m.status == q.status, "\(entry.name) -r \(mode): qemu \(q.status), qimg \(m.status)\n\(m.err)")
        if q.status != 1 {
            #expect(Self.portable(m.out) == Self.portable(q.out), "\(entry.name) -r \(mode)")
            // The report, line by line and in qemu-img's order (a rebuilt refcount
            // structure may land elsewhere, so its lines are not compared).
            if !q.err.contains("Rebuilding refcount structure") {
                #expect(m.err == q.err, "\(entry.name) -r \(mode): stderr differs\nqemu-img:\n\(q.err)\nqimg:\n\(m.err)")
            }
        }
        // Afterwards qemu-img judges both images the same way.
        let qa = try Runner.qemuImg(["check", "q.qcow2"], cwd: dir)
        let ma = try Runner.qemuImg(["check", "m.qcow2"], cwd: dir)
        #expect(ma.status == qa.status, "\(entry.name) after -r \(mode): qemu-repaired \(qa.status), qimg-repaired \(ma.status)\n\(ma.err)")
        let content = try Runner.qemuImg(["compare", "q.qcow2", "m.qcow2"], cwd: dir)
        #expect(content.status == 0 || qa.status != 0, "\(entry.name): contents differ after repair: \(content.out)")
    }

    /// A lazy-refcounts image left dirty by a killed QEMU: `check -r all` and a read-write
    /// open both rebuild the refcounts and clear the dirty bit.
    @Test(.requiresQEMU) func dirtyImageIsRepaired() throws {
        let dir = try Self.scratch("dirty")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try Self.sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "d.qcow2", "16M"], dir)
        // qemu-io's `abort` ends the process without closing the image: dirty bit set, refcounts stale.
        _ = try Runner.qemuIO(["-c", "write -P 0x44 0 1M", "-c", "abort", "d.qcow2"], cwd: dir)
        let before = try Runner.qemuImg(["info", "--output=json", "d.qcow2"], cwd: dir)
        #expect(before.out.contains("\"dirty-flag\": true"), "the image should be dirty: \(before.out)")
        try FileManager.default.copyItem(atPath: dir + "/d.qcow2", toPath: dir + "/e.qcow2")

        let r = try Qimg.run(["check", "-r", "all", "d.qcow2"], cwd: dir)
        #expect(r.status == 0, "\(r.out)\(r.err)")
        try expectCheckClean("d.qcow2", dir, "after check -r all")
        #expect(try Runner.qemuImg(["info", "--output=json", "d.qcow2"], cwd: dir).out.contains("\"dirty-flag\": false"))

        let w = try Qimg.run(["io", "-c", "write -P 0x45 2M 64k", "e.qcow2"], cwd: dir)
        #expect(w.status == 0, "\(w.err)")
        try expectCheckClean("e.qcow2", dir, "after a write")
        #expect(try Runner.qemuIO(["-c", "read -P 0x44 0 1M", "-c", "read -P 0x45 2M 64k", "e.qcow2"], cwd: dir).out.contains("Pattern verification failed") == false)
        #expect(try Runner.qemuImg(["info", "--output=json", "e.qcow2"], cwd: dir).out.contains("\"dirty-flag\": false"))
    }

    /// Resizes like qemu-img's, with data and persistent bitmaps kept valid.
    @Test(.requiresQEMU) func resizeMatchesQemuImg() throws {
        let dir = try Self.scratch("resize")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try Self.sh(["qemu-img", "create", "-q", "-f", "qcow2", "q.qcow2", "1M"], dir)
        _ = try Self.sh(["qemu-io", "-c", "write -P 0x61 0 300k", "-c", "write -P 0x62 900k 100k", "q.qcow2"], dir)
        _ = try Self.sh(["qemu-img", "bitmap", "--add", "q.qcow2", "b0"], dir)
        _ = try Self.sh(["qemu-img", "bitmap", "--add", "-g", "512", "--disable", "q.qcow2", "b1"], dir)
        try FileManager.default.copyItem(atPath: dir + "/q.qcow2", toPath: dir + "/m.qcow2")
        for size in ["2G", "+1G", "3145728k", "1M", "+512"] {
            let q = try Runner.qemuImg(["resize", "--shrink", "q.qcow2", size], cwd: dir)
            let m = try Qimg.run(["resize", "--shrink", "m.qcow2", size], cwd: dir)
            #expect(q.status == 0 && m.status == 0 && m.out == q.out, "resize \(size): \(m.err)")
            let qi = try Runner.qemuImg(["info", "--output=json", "q.qcow2"], cwd: dir).out
            let mi = try Runner.qemuImg(["info", "--output=json", "m.qcow2"], cwd: dir).out
            func strip(_ s: String) -> String { s.split(separator: "\n").filter { !$0.contains("filename") && !$0.contains("actual-size") }.joined(separator: "\n") }
            #expect(strip(mi) == strip(qi), "resize \(size)")
            try expectCheckClean("m.qcow2", dir, "after resize \(size)")
        }
        let r = try Runner.qemuIO(["-c", "read -P 0x61 0 300k", "-c", "read -P 0x62 900k 100k", "-c", "read -P 0 1000k 24k", "m.qcow2"], cwd: dir)
        #expect(!r.out.contains("Pattern verification failed"), "\(r.out)")
        // Shrinking needs --shrink, as in qemu-img, even over unallocated space.
        let refused = try Qimg.run(["resize", "m.qcow2", "512k"], cwd: dir)
        #expect(refused.status == 1 && refused.stderrLines.first == "qimg: Use the --shrink option to perform a shrink operation.", "\(refused.err)")
        _ = try Qimg.run(["resize", "m.qcow2", "8M"], cwd: dir)
        let ok = try Qimg.run(["resize", "--shrink", "m.qcow2", "4M"], cwd: dir)
        #expect(ok.status == 0, "\(ok.err)")
        let bad = try Qimg.run(["resize", "m.qcow2", "+1000"], cwd: dir)
        #expect(bad.status == 1 && bad.err.contains("multiple of 512"))
    }

    /// The size is always the last argument (a negative one needs no `--`), and any
    /// shrink needs --shrink: exit code, messages and resulting size as qemu-img's.
    @Test(.requiresQEMU, arguments: ["qcow2", "raw"])
    func resizeArgumentsMatchQemuImg(_ fmt: String) throws {
        let dir = try Self.scratch("resize-args")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let cases: [[String]] = [
            ["IMG", "-7M"], ["--shrink", "IMG", "-7M"], ["IMG", "--", "-7M"], ["IMG", "--", "4M"], ["IMG", "4M"],
            ["-f", fmt, "IMG", "-1M"], ["--shrink", "IMG", "--", "-1M"], ["IMG", "--shrink", "--", "-2M"], ["IMG", "-0"],
            ["IMG", "-20M"], ["IMG", "-16M"], ["IMG", "-x"], ["IMG", "-q"], ["IMG", "--", "+1M"], ["IMG", "+1M"],
            ["--preallocation=full", "IMG", "-1M"], ["--preallocation=falloc", "--shrink", "IMG", "4M"], ["-q", "--shrink", "IMG", "-3M"],
        ]
        // Raw images get -f raw: qemu-img warns about a probed raw image, qimg does not.
        for c in cases.map({ fmt == "raw" && !$0.contains("-f") ? ["-f", "raw"] + $0 : $0 }) {
            for name in ["q", "m"] {
                try? FileManager.default.removeItem(atPath: "\(dir)/\(name).img")
                _ = try Self.sh(["qemu-img", "create", "-q", "-f", fmt, "\(name).img", "16M"], dir)
                _ = try Self.sh(["qemu-io", "-f", fmt, "-c", "write -P 0x5a 0 1M", "\(name).img"], dir)
            }
            let q = try Runner.qemuImg(["resize"] + c.map { $0 == "IMG" ? "q.img" : $0 }, cwd: dir)
            let m = try Qimg.run(["resize"] + c.map { $0 == "IMG" ? "m.img" : $0 }, cwd: dir)
            let label = "resize \(c.joined(separator: " ")) [\(fmt)]"
            expectSameExit(label, qemu: q, qimg: m)
            expectSameStdout(label, qemu: q, qimg: m)
            #expect(m.err == qimgMessages(q.err.replacingOccurrences(of: "q.img", with: "m.img")), "\(label): stderr\nqemu-img: \(q.err)\nqimg: \(m.err)")
            func size(_ f: String) throws -> String {
                try Runner.qemuImg(["info", "-f", fmt, "--output=json", f], cwd: dir).out.split(separator: "\n").first { $0.contains("virtual-size") }.map(String.init) ?? "?"
            }
            #expect(try size("m.img") == (try size("q.img")), "\(label)")
        }
    }

    @Test(.requiresQEMU) func amendMatchesQemuImg() throws {
        let dir = try Self.scratch("amend")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try Self.sh(["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M"], dir)
        for name in ["q", "m"] {
            _ = try Self.sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2", "\(name).qcow2"], dir)
            _ = try Self.sh(["qemu-io", "-c", "write -P 0x71 0 100k", "\(name).qcow2"], dir)
        }
        func info(_ f: String) throws -> String {
            try Runner.qemuImg(["info", "--output=json", f], cwd: dir).out.split(separator: "\n")
                .filter { !$0.contains("filename") && !$0.contains("actual-size") }.joined(separator: "\n")
        }
        for opts in ["compat=1.1", "lazy_refcounts=on", "lazy_refcounts=off", "compat=0.10", "compat=v3,lazy_refcounts=on"] {
            let q = try Runner.qemuImg(["amend", "-o", opts, "q.qcow2"], cwd: dir)
            let m = try Qimg.run(["amend", "-o", opts, "m.qcow2"], cwd: dir)
            #expect(q.status == 0 && m.status == 0, "amend \(opts): \(m.err)")
            #expect(try info("m.qcow2") == (try info("q.qcow2")), "amend \(opts)")
            try expectCheckClean("m.qcow2", dir, "amend \(opts)")
        }
        #expect(!(try Runner.qemuIO(["-c", "read -P 0x71 0 100k", "m.qcow2"], cwd: dir).out.contains("failed")))
        // Downgrades that would lose information are refused, and change nothing.
        _ = try Self.sh(["qemu-img", "bitmap", "--add", "m.qcow2", "keep"], dir)
        let before = try Data(contentsOf: URL(fileURLWithPath: dir + "/m.qcow2"))
        let r = try Qimg.run(["amend", "-o", "compat=0.10", "m.qcow2"], cwd: dir)
        #expect(r.status == 1 && r.err.contains("bitmaps"), "\(r.err)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir + "/m.qcow2")) == before)
        let c = try Qimg.run(["amend", "-o", "cluster_size=4k", "m.qcow2"], cwd: dir)
        #expect(c.status == 1 && c.stderrLines.count == 1)
    }

    /// A refused amend (issue 13, item 6) leaves the image byte for byte as it was, with
    /// qemu-img's exit code and message: a downgrade is refused while a snapshot's size
    /// differs from the image's (after a resize in the same amend: qemu-img resizes, then
    /// refuses, and keeps the resize); everything is checked before the first write.
    /// A downgrade that qemu-img does (resize to the snapshot's size, then downgrade) works.
    @Test(.requiresQEMU) func refusedAmendChangesNothing() throws {
        let dir = try Self.scratch("amend-refused")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let setups: [(String, [[String]])] = [
            ("grown.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "grown.qcow2", "4M"], ["qemu-io", "-c", "write -P 1 0 64k", "grown.qcow2"],
                             ["qemu-img", "snapshot", "-c", "sn1", "grown.qcow2"], ["qemu-img", "resize", "-q", "grown.qcow2", "8M"]]),
            ("snap.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "snap.qcow2", "4M"], ["qemu-img", "snapshot", "-c", "sn1", "snap.qcow2"]]),
            ("v2.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "4M"]]),
            ("shrunk.qcow2", [["qemu-img", "create", "-q", "-f", "qcow2", "shrunk.qcow2", "4M"], ["qemu-io", "-c", "write -P 1 0 64k", "shrunk.qcow2"],
                              ["qemu-img", "snapshot", "-c", "sn1", "shrunk.qcow2"], ["qemu-img", "resize", "-q", "--shrink", "shrunk.qcow2", "2M"]]),
        ]
        for (_, steps) in setups { for step in steps { _ = try Self.sh(step, dir) } }
        let refused: [(String, String)] = [
            ("grown.qcow2", "compat=0.10"), ("snap.qcow2", "compat=0.10,size=8M"), ("grown.qcow2", "compat=0.10,size=6M"),
            ("v2.qcow2", "compat=1.1,size=1000"), ("v2.qcow2", "lazy_refcounts=on"), ("v2.qcow2", "lazy_refcounts=on,size=8M"),
            ("snap.qcow2", "compat=0.10,size=1000"),
        ]
        let fm = FileManager.default
        for (image, opts) in refused { try AmendTests.expectRefusedAsQemuImg(image, opts, dir) }
        // Resized to the snapshot's size first, then downgraded: as qemu-img does, and the
        // snapshot still applies.
        for n in ["q.qcow2", "m.qcow2"] {
            try? fm.removeItem(atPath: dir + "/" + n)
            try fm.copyItem(atPath: dir + "/shrunk.qcow2", toPath: dir + "/" + n)
        }
        let q = try Runner.qemuImg(["amend", "-o", "compat=0.10,size=4M", "q.qcow2"], cwd: dir)
        let m = try Qimg.run(["amend", "-o", "compat=0.10,size=4M", "m.qcow2"], cwd: dir)
        #expect(q.status == 0 && m.status == 0, "\(m.err)")
        func info(_ f: String) throws -> String {
            try Runner.qemuImg(["info", "--output=json", f], cwd: dir).out.split(separator: "\n")
                .filter { !$0.contains("filename") && !$0.contains("actual-size") && !$0.contains("date-") }.joined(separator: "\n")
        }
        #expect(try info("m.qcow2") == (try info("q.qcow2")))
        #expect(try Runner.qemuImg(["check", "m.qcow2"], cwd: dir).status == 0)
        let apply = try Runner.qemuImg(["snapshot", "-a", "sn1", "m.qcow2"], cwd: dir)
        #expect(apply.status == 0, "\(apply.err)")
    }

    /// A broken bitmap table makes the image unopenable for every QEMU tool; `check`
    /// reports it and `check -r all` drops the bitmaps, keeping the guest data. An
    /// inconsistent (in use) bitmap is reported and removed by `-r all` too.
    @Test(.requiresQEMU) func repairDropsBrokenAndInconsistentBitmaps() throws {
        let dir = try Self.scratch("bitmap-repair")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try Self.sh(["qemu-img", "create", "-q", "-f", "qcow2", "b.qcow2", "16M"], dir)
        _ = try Self.sh(["qemu-io", "-c", "write -P 9 0 1M", "b.qcow2"], dir)
        _ = try Self.sh(["qemu-img", "bitmap", "--add", "b.qcow2", "b0"], dir)
        _ = try Self.sh(["qemu-io", "-c", "write 2M 64k", "b.qcow2"], dir)
        // Set a reserved bit in the first bitmap table entry (located through the header).
        let url = URL(fileURLWithPath: dir + "/b.qcow2")
        var bytes = [UInt8](try Data(contentsOf: url))
        func be(_ o: Int, _ n: Int) -> UInt64 { (0..<n).reduce(0) { $0 << 8 | UInt64(bytes[o + $1]) } }
        var off = 112
        while be(off, 4) != 0x2385_2875 { off += 8 + ((Int(be(off + 4, 4)) + 7) & ~7) }
        let dirOffset = Int(be(off + 8 + 16, 8))
        let tableOffset = Int(be(dirOffset, 8))
        bytes[tableOffset + 7] = 2
        try Data(bytes).write(to: url)
        #expect(try Runner.qemuImg(["check", "b.qcow2"], cwd: dir).status == 1, "QEMU should not open it")

        let c = try Qimg.run(["check", "b.qcow2"], cwd: dir)
        #expect(c.status == 2 && c.err.contains("ERROR bitmaps"), "\(c.err)")
        let r = try Qimg.run(["check", "-r", "all", "b.qcow2"], cwd: dir)
        #expect(r.status == 0, "\(r.out)\(r.err)")
        try expectCheckClean("b.qcow2", dir, "after -r all")
        #expect(!(try Runner.qemuIO(["-c", "read -P 9 0 1M", "b.qcow2"], cwd: dir).out.contains("failed")))

        // An inconsistent bitmap: reported by check, removed by -r all.
        _ = try Self.sh(["qemu-img", "bitmap", "--add", "b.qcow2", "stale"], dir)
        _ = try Self.sh(["qemu-img", "bitmap", "--add", "b.qcow2", "fine"], dir)
        _ = try Runner.qemuIO(["-c", "write 0 4k", "-c", "abort", "b.qcow2"], cwd: dir)
        _ = try Self.sh(["qemu-img", "bitmap", "--remove", "b.qcow2", "fine"], dir)
        _ = try Self.sh(["qemu-img", "bitmap", "--add", "b.qcow2", "fine"], dir)
        let c2 = try Qimg.run(["check", "b.qcow2"], cwd: dir)
        #expect(c2.status == 0 && c2.err.contains("'stale' is inconsistent"), "\(c2.err)")
        let r2 = try Qimg.run(["check", "-r", "all", "b.qcow2"], cwd: dir)
        #expect(r2.status == 0, "\(r2.err)")
        let info = try Runner.qemuImg(["info", "b.qcow2"], cwd: dir).out
        #expect(!info.contains("stale") && info.contains("fine"), "\(info)")
        try expectCheckClean("b.qcow2", dir, "after removing the inconsistent bitmap")
    }
}
