import Foundation
import Testing
import TestSupport

/// `amend -o refcount_bits=N` (issue 13, item 14) against qemu-img doing the same to a copy.
@Suite struct AmendTests {
    static func sh(_ args: [String], _ dir: String) throws -> RunResult { try Runner.qemuStep(args, in: dir) }

    /// qemu-img info --output=json without what depends on the file's name or layout.
    static func info(_ f: String, _ dir: String) throws -> String {
        try Runner.qemuImg(["info", "--output=json", f], cwd: dir).out.split(separator: "\n")
            .filter { !$0.contains("filename") && !$0.contains("actual-size") }.joined(separator: "\n")
    }

    static func copy(_ from: String, to names: [String], _ dir: String) throws {
        for n in names {
            try? FileManager.default.removeItem(atPath: dir + "/" + n)
            try FileManager.default.copyItem(atPath: dir + "/" + from, toPath: dir + "/" + n)
        }
    }

    /// `amend -o OPTS` by qemu-img on q.qcow2 and by qimg on m.qcow2: both succeed, the
    /// same `qemu-img info` (which shows `expected`), qimg's result `qemu-img check` clean.
    static func amendBoth(_ opts: String, showing expected: String, _ label: String, _ dir: String,
                          sourceLocation: SourceLocation = #_sourceLocation) throws {
        let q = try Runner.qemuImg(["amend", "-o", opts, "q.qcow2"], cwd: dir)
        let m = try Qimg.run(["amend", "-o", opts, "m.qcow2"], cwd: dir)
        #expect(q.status == 0, "\(label): qemu-img: \(q.err)", sourceLocation: sourceLocation)
        #expect(m.status == 0 && m.err.isEmpty, "\(label): \(m.summary): \(m.err)", sourceLocation: sourceLocation)
        let mi = try info("m.qcow2", dir)
        #expect(mi == (try info("q.qcow2", dir)), "\(label)", sourceLocation: sourceLocation)
        #expect(mi.contains(expected), "\(label): \(mi)", sourceLocation: sourceLocation)
        try expectCheckClean("m.qcow2", dir, label, sourceLocation: sourceLocation)
    }

    /// `amend -o OPTS` on copies of `image` (q.qcow2, m.qcow2): qemu-img refuses it, qimg
    /// too with the same exit code and message, and leaves its copy byte for byte as it was.
    static func expectRefusedAsQemuImg(_ image: String, _ opts: String, _ dir: String,
                                       sourceLocation: SourceLocation = #_sourceLocation) throws {
        let label = "amend -o \(opts) \(image)"
        try copy(image, to: ["q.qcow2", "m.qcow2"], dir)
        let before = try Data(contentsOf: URL(fileURLWithPath: dir + "/m.qcow2"))
        let q = try Runner.qemuImg(["amend", "-o", opts, "q.qcow2"], cwd: dir)
        let m = try Qimg.run(["amend", "-o", opts, "m.qcow2"], cwd: dir)
        #expect(q.status == 1, "\(label): qemu-img \(q.status)", sourceLocation: sourceLocation)
        expectSameExit(label, qemu: q, qimg: m, sourceLocation: sourceLocation)
        #expect(m.err == qimgMessages(q.err), "\(label): stderr\nqemu-img: \(q.err)\nqimg:     \(m.err)", sourceLocation: sourceLocation)
        #expect(try Data(contentsOf: URL(fileURLWithPath: dir + "/m.qcow2")) == before, "\(label): the image was changed",
                sourceLocation: sourceLocation)
    }

    /// A 16-bit image with data written before and after an internal snapshot (shared
    /// clusters: refcount 2) and a persistent bitmap with bits set; `plain.qcow2`: the
    /// same without the snapshot (every refcount fits in one bit).
    static func makeImages(_ dir: String) throws {
        for (name, snapshot) in [("snap.qcow2", true), ("plain.qcow2", false)] {
            _ = try sh(["qemu-img", "create", "-q", "-f", "qcow2", name, "64M"], dir)
            _ = try sh(["qemu-img", "bitmap", "--add", name, "b0"], dir)
            _ = try sh(["qemu-io", "-c", "write -P 1 0 3M", "-c", "write -P 2 40M 1M", name], dir)
            if snapshot { _ = try sh(["qemu-img", "snapshot", "-c", "s1", name], dir) }
            _ = try sh(["qemu-io", "-c", "write -P 3 1M 1M", "-c", "write -P 4 63M 64k", name], dir)
        }
    }

    /// Each width from 16 and back, on an image with a snapshot and a bitmap (1 bit on
    /// the one without a snapshot): the same `qemu-img info` as qemu-img's result
    /// (refcount-bits, snapshots, bitmaps), `qemu-img check` clean, the same guest data.
    @Test(.requiresQEMU) func refcountWidthMatchesQemuImg() throws {
        let dir = try Paths.newScratch("amend-refcount")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeImages(dir)
        for bits in [1, 2, 4, 8, 32, 64] {
            let source = bits == 1 ? "plain.qcow2" : "snap.qcow2"
            try Self.copy(source, to: ["q.qcow2", "m.qcow2"], dir)
            for (step, width) in [bits, 16].enumerated() {
                let label = "\(source) refcount_bits=\(width) (step \(step + 1) from 16 to \(bits) and back)"
                try Self.amendBoth("refcount_bits=\(width)", showing: "\"refcount-bits\": \(width)", label, dir)
                let c = try Runner.qemuImg(["compare", "-f", "qcow2", "-F", "qcow2", source, "m.qcow2"], cwd: dir)
                #expect(c.status == 0, "\(label): \(c.out)\(c.err)")
            }
        }
        // The snapshot's data is intact after a change of width (read through the snapshot).
        try Self.copy("snap.qcow2", to: ["m.qcow2"], dir)
        _ = try Qimg.run(["amend", "-o", "refcount_bits=64", "m.qcow2"], cwd: dir)
        for name in ["snap", "m"] {
            _ = try Self.sh(["qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "raw", "\(name).qcow2", "\(name)-s1.raw"], dir)
        }
        let c = try Runner.qemuImg(["compare", "-f", "raw", "-F", "raw", "snap-s1.raw", "m-s1.raw"], cwd: dir)
        #expect(c.status == 0, "snapshot s1 after refcount_bits=64: \(c.out)\(c.err)")
    }

    /// Refusals as qemu-img's (exit code, message), each leaving the file byte for byte
    /// as it was: invalid widths, a width other than 16 with compat=0.10, a refcount the
    /// new width cannot hold (a snapshot's shared clusters with 1 bit).
    @Test(.requiresQEMU) func refusedRefcountWidthChangesNothing() throws {
        let dir = try Paths.newScratch("amend-refcount-refused")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeImages(dir)
        _ = try Self.sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "4M"], dir)
        _ = try Self.sh(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "refcount_bits=8", "r8.qcow2", "4M"], dir)
        let refused: [(String, String)] = [
            ("snap.qcow2", "refcount_bits=1"), ("snap.qcow2", "refcount_bits=3"), ("snap.qcow2", "refcount_bits=0"),
            ("snap.qcow2", "refcount_bits=128"), ("snap.qcow2", "refcount_bits=abc"), ("v2.qcow2", "refcount_bits=8"),
            ("plain.qcow2", "refcount_bits=8,compat=0.10"), ("v2.qcow2", "refcount_bits=3,compat=1.1"),
            ("r8.qcow2", "compat=0.10"), ("snap.qcow2", "refcount_bits=1,lazy_refcounts=on"),
        ]
        for (image, opts) in refused { try Self.expectRefusedAsQemuImg(image, opts, dir) }
        // Allowed together: a v2 image upgraded and narrowed, an 8-bit image widened to 16
        // and downgraded.
        for (image, opts, shown) in [("v2.qcow2", "compat=1.1,refcount_bits=8", "\"refcount-bits\": 8"),
                                     ("r8.qcow2", "compat=0.10,refcount_bits=16", "\"compat\": \"0.10\"")] {
            try Self.copy(image, to: ["q.qcow2", "m.qcow2"], dir)
            try Self.amendBoth(opts, showing: shown, "amend -o \(opts) \(image)", dir)
        }
    }

    /// An image with zero clusters of every kind, in the active table and in a snapshot's:
    /// allocated ones (one shared with the snapshot through a copied L2 table), unallocated
    /// ones, and (`backed`) a backing file they hide.
    static func makeZeroClusterImage(_ name: String, backed: Bool, _ dir: String) throws {
        var create = ["qemu-img", "create", "-q", "-f", "qcow2", name, "4M"]
        if backed {
            _ = try sh(["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M"], dir)
            _ = try sh(["qemu-io", "-c", "write -P 7 0 4M", "base.qcow2"], dir)
            create = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", name, "4M"]
        }
        _ = try sh(create, dir)
        _ = try sh(["qemu-io", "-c", "write -P 1 0 192k", "-c", "write -z 64k 64k", "-c", "write -z 1M 128k", "-c", "write -z -u 128k 64k", name], dir)
        _ = try sh(["qemu-img", "snapshot", "-c", "s1", name], dir)
        _ = try sh(["qemu-io", "-c", "write -z 2M 64k", "-c", "write -P 2 3M 64k", "-c", "write -z -u 3M 64k", name], dir)
    }

    /// Per 64 KiB cluster of a `qemu-img map --output=json`: present, depth and data (the
    /// offsets and the zero flag depend on where clusters went and on host-file holes).
    static func mapShape(_ f: String, _ dir: String) throws -> [String] {
        let out = try Runner.qemuImg(["map", "--output=json", f], cwd: dir).out
        let list = try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [[String: Any]] ?? []
        var shape: [String] = []
        for e in list {
            let start = (e["start"] as? Int) ?? 0, length = (e["length"] as? Int) ?? 0
            let key = "\(e["present"] ?? "") \(e["depth"] ?? "") \(e["data"] ?? "")"
            for c in stride(from: start, to: start + length, by: 65536) { shape.append("\(c): \(key)") }
        }
        return shape
    }

    /// `amend -o compat=0.10` of an image with zero clusters, with and without a backing
    /// file, against qemu-img's: the same guest data (active and snapshot), the same
    /// `qemu-img info`, the same map shape (allocated, depth, data per cluster), and
    /// `qemu-img check` clean. (qemu-img 7.2's own result fails its check: it marks a
    /// zero cluster shared with the snapshot COPIED after writing it in place; qimg gives
    /// that entry a new cluster instead, so offsets differ there.)
    @Test(.requiresQEMU, arguments: [false, true]) func zeroClusterDowngradeMatchesQemuImg(_ backed: Bool) throws {
        let dir = try Paths.newScratch("amend-zero")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.makeZeroClusterImage("z.qcow2", backed: backed, dir)
        try Self.copy("z.qcow2", to: ["q.qcow2", "m.qcow2"], dir)
        let label = backed ? "with a backing file" : "without a backing file"
        try Self.amendBoth("compat=0.10", showing: "\"compat\": \"0.10\"", label, dir)
        #expect(try Self.mapShape("m.qcow2", dir) == (try Self.mapShape("q.qcow2", dir)), "\(label): map")
        for other in ["z.qcow2", "q.qcow2"] {
            let c = try Runner.qemuImg(["compare", "-f", "qcow2", "-F", "qcow2", other, "m.qcow2"], cwd: dir)
            #expect(c.status == 0, "\(label): compared with \(other): \(c.out)\(c.err)")
        }
        for name in ["z", "m"] {
            _ = try Self.sh(["qemu-img", "convert", "-l", "snapshot.name=s1", "-O", "raw", "\(name).qcow2", "\(name)-s1.raw"], dir)
        }
        let c = try Runner.qemuImg(["compare", "-f", "raw", "-F", "raw", "z-s1.raw", "m-s1.raw"], cwd: dir)
        #expect(c.status == 0, "\(label): snapshot s1: \(c.out)\(c.err)")
    }

    /// SIGKILL at every write and every sync of `amend -o refcount_bits=64` (and of a
    /// compat=0.10 that expands zero clusters): afterwards the image opens, its guest data
    /// is the original's and `qemu-img check` finds no errors (clusters written before the
    /// switch may be leaked).
    @Test(.requiresQEMU, arguments: ["refcount_bits=64", "compat=0.10"])
    func killDuringAmendLeavesAConsistentImage(_ opts: String) throws {
        let dir = try Paths.newScratch("amend-kill")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source: String
        if opts == "compat=0.10" {
            try Self.makeZeroClusterImage("zero.qcow2", backed: true, dir)
            source = "zero.qcow2"
        } else {
            try Self.makeImages(dir)
            source = "snap.qcow2"
        }
        var kills = 0
        for kind in ["write", "sync"] {
            var n = 1
            while n < 100 {
                try Self.copy(source, to: ["img.qcow2"], dir)
                let spec = "\(kind):\(n):kill\(kind == "write" && n % 2 == 1 ? ":partial" : ""),prefix:img.qcow2"
                let label = "\(opts): QIMG_FAULTS=\(spec)"
                let r = try Runner.run("/usr/bin/env", ["QIMG_FAULTS=\(spec)", Qimg.path, "amend", "-o", opts, "img.qcow2"], cwd: dir)
                if r.exitedNormally {  // past the last call: nothing left to kill
                    #expect(r.status == 0, "\(label): \(r.summary): \(r.err)")
                    try expectCheckClean("img.qcow2", dir, label)
                    break
                }
                #expect(r.signaled && r.status == SIGKILL, "\(label): \(r.summary): \(r.err)")
                kills += 1
                try expectCheckClean("img.qcow2", dir, label, leaksAllowed: true)
                let c = try Runner.qemuImg(["compare", "-f", "qcow2", "-F", "qcow2", source, "img.qcow2"], cwd: dir)
                #expect(c.status == 0, "\(label): guest data differs: \(c.out)\(c.err)")
                let opened = try Qimg.run(["info", "img.qcow2"], cwd: dir)
                #expect(opened.status == 0, "\(label): \(opened.err)")
                n += 1
            }
            #expect(n > 1, "\(kind): no \(kind) was reached (the campaign kills nothing)")
        }
        // The new structure or data, a barrier, the switch (header or entries), a barrier.
        #expect(kills >= 4, "only \(kills) kills")
    }
}
