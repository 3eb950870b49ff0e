import Foundation
import Testing
import TestSupport

/// `qimg snapshot -l|-c|-a|-d` against qemu-img 7.2 (issue 13 item 1): the list, snapshots
/// made by either tool applied and deleted by the other with the right data and a clean
/// `qemu-img check` after every step, qemu-img's refusals, and a SIGKILL at every write
/// of a create or delete.
@Suite(.requiresQEMU) struct SnapshotTests {
    /// Image kinds: qemu-img create options and whether the data is written compressed.
    struct Kind: Sendable, CustomTestStringConvertible {
        var name: String
        var options: [String]
        /// Every cluster compressed, streams packed into shared host clusters (convert -c).
        var packed = false
        var testDescription: String { name }
    }

    static let kinds: [Kind] = [
        Kind(name: "default", options: []),
        Kind(name: "compat=0.10", options: ["-o", "compat=0.10"]),
        Kind(name: "extended_l2", options: ["-o", "extended_l2=on"]),
        Kind(name: "4k clusters, 64-bit refcounts", options: ["-o", "cluster_size=4096,refcount_bits=64"]),
        Kind(name: "packed compressed clusters", options: [], packed: true),
    ]

    /// A 64 MiB image: pattern 1 in [0, 1M), a compressed cluster of 3 at 2M, 4 at 3M (4k)
    /// (all compressed and packed for a `packed` kind).
    static func makeImage(_ kind: Kind, _ label: String) throws -> String {
        let dir = try Paths.newScratch("snapshot-\(label)")
        let name = kind.packed ? "src.qcow2" : "a.qcow2"
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2"] + kind.options + [name, "64M"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -c -P 3 2M 64k", "-c", "write -P 4 3M 4k", name], in: dir)
        if kind.packed { try Runner.qemuStep(["qemu-img", "convert", "-c", "-O", "qcow2", name, "a.qcow2"], in: dir) }
        return dir
    }

    /// Runs qimg (`tool` "qimg") or qemu-img with `args`; requires exit 0.
    static func step(_ tool: String, _ args: [String], in dir: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = tool == "qimg" ? try Qimg.run(args, cwd: dir) : try Runner.qemuImg(args, cwd: dir)
        try #require(r.exitedNormally && r.status == 0, "\(tool) \(args.joined(separator: " ")): \(r.summary): \(r.err)",
                     sourceLocation: sourceLocation)
        try expectCheckClean("a.qcow2", dir, "after \(tool) \(args.joined(separator: " "))", sourceLocation: sourceLocation)
    }

    /// qemu-io reads each (pattern, offset, length); all must match.
    static func expectData(_ dir: String, _ reads: [(Int, String, String)], _ label: String,
                           sourceLocation: SourceLocation = #_sourceLocation) throws {
        let r = try readData(dir, reads)
        #expect(r.status == 0 && !r.out.contains("Pattern verification failed"), "\(label): \(r.out)\(r.err)",
                sourceLocation: sourceLocation)
    }

    static func readData(_ dir: String, _ reads: [(Int, String, String)]) throws -> RunResult {
        try Runner.qemuIO(["-r"] + reads.flatMap { ["-c", "read -P \($0.0) \($0.1) \($0.2)"] } + ["a.qcow2"], cwd: dir)
    }

    static let original: [(Int, String, String)] = [(1, "0", "1M"), (3, "2M", "64k"), (4, "3M", "4k"), (0, "4M", "1M")]
    static let changed: [(Int, String, String)] = [(2, "0", "512k"), (1, "512k", "256k"), (0, "768k", "128k"), (1, "896k", "128k"),
                                                   (5, "2M", "4k"), (3, "2052k", "60k"), (0, "3M", "4k")]

    /// The writes of `changed`: data over data, into a compressed cluster, zeroes over data,
    /// a discard of whole clusters.
    static func changeData(_ tool: String, in dir: String) throws {
        let cmds = ["-c", "write -P 2 0 512k", "-c", "write -P 5 2M 4k", "-c", "write -z 3M 4k", "-c", "discard 768k 128k"]
        let r = tool == "qimg" ? try Qimg.run(["io"] + cmds + ["a.qcow2"], cwd: dir) : try Runner.qemuIO(cmds + ["a.qcow2"], cwd: dir)
        try #require(r.status == 0, "\(tool) io: \(r.summary): \(r.err)")
        try expectCheckClean("a.qcow2", dir, "after \(tool) io writes")
    }

    /// One tool creates the snapshots, the other writes over shared clusters (its
    /// copy-on-write must leave the snapshot's data alone), applies and deletes them.
    @Test(arguments: kinds, ["qimg", "qemu-img"])
    func snapshotsOfOneToolServeTheOther(_ kind: Kind, _ creator: String) throws {
        let user = creator == "qimg" ? "qemu-img" : "qimg"
        let writer = user == "qimg" ? "qimg" : "qemu-io"
        let dir = try Self.makeImage(kind, "by-\(creator)")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.step(creator, ["snapshot", "-c", "s1", "a.qcow2"], in: dir)
        try Self.changeData(writer, in: dir)
        try Self.expectData(dir, Self.changed, "\(writer)'s writes after \(creator)'s snapshot")
        try Self.step(creator, ["snapshot", "-c", "s2", "a.qcow2"], in: dir)
        try Self.step(user, ["snapshot", "-a", "s1", "a.qcow2"], in: dir)
        try Self.expectData(dir, Self.original, "\(user) -a s1: the snapshot's data, untouched by the writes")
        try Self.changeData(writer, in: dir)
        try Self.step(user, ["snapshot", "-a", "2", "a.qcow2"], in: dir)
        try Self.expectData(dir, Self.changed, "\(user) -a 2 (by ID)")
        try Self.step(user, ["snapshot", "-d", "s1", "a.qcow2"], in: dir)
        try Self.step(user, ["snapshot", "-a", "s2", "a.qcow2"], in: dir)
        try Self.expectData(dir, Self.changed, "\(user) -a s2 after deleting s1")
        try Self.step(user, ["snapshot", "-d", "s2", "a.qcow2"], in: dir)
        try Self.expectData(dir, Self.changed, "after deleting every snapshot")
        let l = try Runner.qemuImg(["snapshot", "-l", "a.qcow2"], cwd: dir)
        #expect(l.status == 0 && l.out.isEmpty, "snapshots left: \(l.out)")
    }

    /// `-l` (and info's list) byte-identical on the same file; between a qimg-made and a
    /// qemu-img-made snapshot only the DATE column may differ (it is normalized).
    @Test func listMatchesQEMU() throws {
        let dir = try Self.makeImage(Self.kinds[0], "list")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let empty = try runBoth(["snapshot", "-l", "a.qcow2"], cwd: dir)
        expectSameExit("-l without snapshots", qemu: empty.qemu, qimg: empty.qimg)
        expectSameStdout("-l without snapshots", qemu: empty.qemu, qimg: empty.qimg)
        try FileManager.default.copyItem(atPath: dir + "/a.qcow2", toPath: dir + "/q.qcow2")
        let long = String(repeating: "n", count: 300), utf8 = "s\u{e9}l\u{e9}ction-\u{1F600}"
        for name in ["s1", "s1", "", long, utf8, "-dash"] {
            try Self.step("qimg", ["snapshot", "-c", name, "a.qcow2"], in: dir)
            let q = try Runner.qemuImg(["snapshot", "-c", name, "q.qcow2"], cwd: dir)
            try #require(q.status == 0, "qemu-img snapshot -c: \(q.err)")
        }
        let opts = ["snapshot", "-l", "--image-opts", "driver=qcow2,file.filename=a.qcow2"]
        let (oq, om) = try runBoth(opts, cwd: dir)
        expectSameExit("--image-opts", qemu: oq, qimg: om)
        expectSameStdout("--image-opts", qemu: oq, qimg: om)
        for args in [["snapshot", "-l"], ["snapshot", "-l", "-U"], ["info"], ["info", "--output=json"]] {
            let (q, m) = try runBoth(args + ["a.qcow2"], cwd: dir)
            let label = args.joined(separator: " ")
            expectSameExit(label, qemu: q, qimg: m)
            expectSameStdout(label, qemu: q, qimg: m)
            // The same snapshots made by qemu-img: equal but for the dates.
            let other = try Runner.qemuImg(args + ["q.qcow2"], cwd: dir)
            #expect(Self.withoutDates(other.out.replacingOccurrences(of: "q.qcow2", with: "a.qcow2")) == Self.withoutDates(q.out),
                    "\(label): qimg's snapshots differ from qemu-img's\n\(q.out)---\n\(other.out)")
        }
    }

    /// The DATE column of the list and the date fields of info's JSON, blanked, and the
    /// disk size lines that follow from the file's length.
    static func withoutDates(_ s: String) -> String {
        s.split(separator: "\n", omittingEmptySubsequences: false).map { line -> String in
            if line.contains("date-sec") || line.contains("date-nsec") || line.contains("actual-size") || line.hasPrefix("disk size") { return "" }
            return line.replacingOccurrences(of: #"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"#, with: "DATE", options: .regularExpression)
        }.joined(separator: "\n")
    }

    /// Refusals: qemu-img's message and exit code, and the file byte-identical.
    @Test func refusalsMatchQEMU() throws {
        let dir = try Self.makeImage(Self.kinds[0], "refusals")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.step("qemu-img", ["snapshot", "-c", "s1", "a.qcow2"], in: dir)
        try Self.step("qemu-img", ["bitmap", "--add", "a.qcow2", "b0"], in: dir)
        let cases: [[String]] = [
            ["snapshot", "-a", "nope", "a.qcow2"], ["snapshot", "-d", "nope", "a.qcow2"],
            ["snapshot", "-d", "1", "a.qcow2"],          // delete looks names up only
            ["snapshot", "-a", "s1", "a.qcow2"],         // persistent bitmaps
            ["snapshot", "-l", "-c", "x", "a.qcow2"], ["snapshot", "-c", "x", "-d", "y", "a.qcow2"],
            ["snapshot", "-l"], ["snapshot", "-l", "a.qcow2", "a.qcow2"],
        ]
        for args in cases {
            // qemu-img first (opening an image with bitmaps read-write rewrites its header).
            let q = try Runner.qemuImg(args, cwd: dir)
            let before = try FileState(dir + "/a.qcow2")
            let m = try Qimg.run(args, cwd: dir)
            let label = args.joined(separator: " ")
            expectSameExit(label, qemu: q, qimg: m)
            // qemu-img's first line (its second is "Try 'qemu-img --help'...").
            let first = q.err.split(separator: "\n").first.map { qimgMessages(String($0)) } ?? ""
            #expect(first == m.err, "\(label): stderr\n\(q.err)---\n\(m.err)")
            expectCleanFailure(label, m, exitCode: 1)
            #expect(try FileState(dir + "/a.qcow2") == before, "\(label): the file changed")
        }
        // Disabled bitmaps too, as in qemu-img.
        try Self.step("qemu-img", ["bitmap", "--disable", "a.qcow2", "b0"], in: dir)
        let (q, m) = try runBoth(["snapshot", "-a", "s1", "a.qcow2"], cwd: dir)
        expectSameExit("apply with a disabled bitmap", qemu: q, qimg: m)
        #expect(qimgMessages(q.err) == m.err, "stderr\n\(q.err)---\n\(m.err)")
        // Create and delete work with bitmaps, as in qemu-img; the bitmap stays consistent.
        try Self.step("qimg", ["snapshot", "-c", "s2", "a.qcow2"], in: dir)
        try Self.step("qimg", ["snapshot", "-d", "s1", "a.qcow2"], in: dir)
        let info = try Runner.qemuImg(["info", "a.qcow2"], cwd: dir)
        #expect(info.out.contains("name: b0") && !info.out.contains("in-use"), "bitmap after create/delete: \(info.out)")
    }

    /// Refusals where qemu-img's words name its own options or leak a cluster: a clean
    /// one-line failure with the file unchanged.
    @Test func refusalsLeaveTheFileUnchanged() throws {
        let dir = try Self.makeImage(Kind(name: "refcount_bits=1", options: ["-o", "refcount_bits=1"]), "refusals-own")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var cases: [(String, [String])] = [
            ("1-bit refcounts cannot share a cluster (qemu-img fails and leaks one)", ["snapshot", "-c", "s1", "a.qcow2"]),
            ("-U with a writer", ["snapshot", "-U", "-c", "s1", "a.qcow2"]),
            ("-f is not an option of qemu-img snapshot", ["snapshot", "-f", "qcow2", "-c", "s1", "a.qcow2"]),
        ]
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "gone.qcow2", "1M"], in: dir)
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", "top.qcow2"], in: dir)
        try FileManager.default.removeItem(atPath: dir + "/gone.qcow2")
        cases += [("missing backing file (qemu-img opens the chain)", ["snapshot", "-c", "s1", "top.qcow2"]),
                  ("missing backing file, list", ["snapshot", "-l", "top.qcow2"])]
        try FileManager.default.copyItem(atPath: dir + "/a.qcow2", toPath: dir + "/ro.qcow2")
        chmod(dir + "/ro.qcow2", 0o444)
        cases.append(("read-only file", ["snapshot", "-c", "s1", "ro.qcow2"]))
        for (label, args) in cases {
            let file = dir + "/" + args.last!
            let q = try Runner.qemuImg(args, cwd: dir)  // (it may leak a cluster)
            #expect(q.status != 0, "\(label): qemu-img succeeded")
            let before = try FileState(file)
            let m = try Qimg.run(args, cwd: dir)
            expectCleanFailure(label, m, exitCode: 1)
            #expect(try FileState(file) == before, "\(label): the file changed")
        }
    }

    /// A v3 image resized after a snapshot gets the snapshot's size back when it is
    /// applied (by either tool), and a shrink leaves the snapshot's data alone; a v2 image
    /// with snapshots cannot be resized (as in qemu-img 7.2).
    @Test func resizeAndApplyRestoreTheSize() throws {
        let dir = try Self.makeImage(Self.kinds[0], "resize")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.step("qimg", ["snapshot", "-c", "s1", "a.qcow2"], in: dir)
        try Self.step("qimg", ["resize", "a.qcow2", "128M"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 7 100M 64k", "a.qcow2"], in: dir)
        try FileManager.default.copyItem(atPath: dir + "/a.qcow2", toPath: dir + "/b.qcow2")
        try Self.step("qimg", ["snapshot", "-a", "s1", "a.qcow2"], in: dir)
        try Runner.qemuStep(["qemu-img", "snapshot", "-a", "s1", "b.qcow2"], in: dir)
        let (q, m) = (try Runner.qemuImg(["info", "--output=json", "b.qcow2"], cwd: dir), try Runner.qemuImg(["info", "--output=json", "a.qcow2"], cwd: dir))
        #expect(q.out.contains("\"virtual-size\": 67108864") && m.out.contains("\"virtual-size\": 67108864"), "sizes: \(q.out)\n\(m.out)")
        try Self.expectData(dir, Self.original, "after applying over a resize")
        let c = try Runner.qemuImg(["compare", "a.qcow2", "b.qcow2"], cwd: dir)
        #expect(c.status == 0, "qimg's apply and qemu-img's differ: \(c.out)")

        // Shrinking drops the active image's references only: the snapshot keeps its data.
        try Self.step("qimg", ["resize", "--shrink", "a.qcow2", "1M"], in: dir)
        try Self.step("qemu-img", ["snapshot", "-a", "s1", "a.qcow2"], in: dir)
        try Self.expectData(dir, Self.original, "the snapshot after a shrink of the active image")

        let v2 = try Self.makeImage(Self.kinds[1], "resize-v2")
        defer { try? FileManager.default.removeItem(atPath: v2) }
        try Self.step("qimg", ["snapshot", "-c", "s1", "a.qcow2"], in: v2)
        let before = try FileState(v2 + "/a.qcow2")
        let (rq, rm) = try runBoth(["resize", "a.qcow2", "128M"], cwd: v2)
        expectSameExit("resize v2 with snapshots", qemu: rq, qimg: rm)
        #expect(rm.err.contains("Can't resize a v2 image which has snapshots"), "\(rm.err)")
        #expect(try FileState(v2 + "/a.qcow2") == before, "a refused resize changed the file")
    }

    /// check, map and info read an image with qimg-made snapshots as qemu-img does.
    @Test func readersMatchQEMUWithSnapshots() throws {
        let dir = try Self.makeImage(Self.kinds[0], "readers")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.step("qimg", ["snapshot", "-c", "s1", "a.qcow2"], in: dir)
        try Self.changeData("qimg", in: dir)
        try Self.step("qimg", ["snapshot", "-c", "s2", "a.qcow2"], in: dir)
        for args in [["check"], ["check", "--output=json"], ["map", "--output=json"], ["map"], ["info"]] {
            let (q, m) = try runBoth(args + ["a.qcow2"], cwd: dir)
            let label = args.joined(separator: " ")
            expectSameExit(label, qemu: q, qimg: m)
            expectSameStdout(label, qemu: q, qimg: m)
        }
    }

    /// SIGKILL at each write of a create, a delete and an apply (QIMG_FAULTS=write:N:kill,
    /// debug builds), until the command runs through. After each kill: the active data (for
    /// apply: the old or the snapshot's) and every snapshot's data are intact, the list is
    /// the old or the new one, and qemu-img check
    /// finds at worst leaked clusters or, while COPIED flags are being switched, a COPIED
    /// flag clear on a cluster whose refcount is 1 ("ERROR OFLAG_COPIED ... refcount=1":
    /// harmless, writers copy such a cluster; QEMU's own create, apply and delete have the same
    /// window, which no order avoids since flags and refcounts live in different clusters);
    /// `qemu-img check -r all` then leaves the image clean.
    @Test(arguments: ["create", "delete", "apply"]) func killedAtEveryWrite(_ op: String) throws {
        var n = 1
        while true {
            let dir = try Self.makeImage(Self.kinds[0], "kill-\(op)-\(n)")
            defer { try? FileManager.default.removeItem(atPath: dir) }
            try Runner.qemuStep(["qemu-img", "snapshot", "-c", "s0", "a.qcow2"], in: dir)
            try Runner.qemuStep(["qemu-io", "-c", "write -P 8 0 64k", "a.qcow2"], in: dir)
            let active: [(Int, String, String)] = [(8, "0", "64k"), (1, "64k", "960k"), (3, "2M", "64k")]
            let oldList = try Runner.qemuImg(["snapshot", "-l", "a.qcow2"], cwd: dir).out
            let args = ["snapshot"] + ["create": ["-c", "s1"], "delete": ["-d", "s0"], "apply": ["-a", "s0"]][op]! + ["a.qcow2"]
            let r = try Runner.run("/usr/bin/env", ["QIMG_FAULTS=write:\(n):kill", Qimg.path] + args, cwd: dir)
            let label = "\(op), killed at write \(n)"
            if r.exitedNormally && r.status == 0 {
                #expect(n > 3, "\(op) made only \(n - 1) writes: is fault injection compiled in (debug build)?")
                print("SnapshotTests: \(op) killed at each of its \(n - 1) writes")
                try expectCheckClean("a.qcow2", dir, "\(op) run through")
                return
            }
            try #require(r.signaled && r.status == SIGKILL, "\(label): \(r.summary): \(r.err)")
            let check = try Runner.qemuImg(["check", "a.qcow2"], cwd: dir)
            let bad = check.err.split(separator: "\n").filter {
                !($0.hasPrefix("Leaked cluster") || ($0.hasPrefix("ERROR OFLAG_COPIED") && $0.hasSuffix(" refcount=1")))
            }
            #expect([0, 2, 3].contains(check.status) && bad.isEmpty, "\(label): qemu-img check: \(check.summary)\n\(check.err)")
            if op == "apply" {
                let (a, o) = (try Self.readData(dir, active), try Self.readData(dir, Self.original))
                #expect([a, o].contains { $0.status == 0 && !$0.out.contains("verification failed") }, "\(label): \(a.out)\(o.out)")
            } else {
                try Self.expectData(dir, active, label)
            }
            let list = try Runner.qemuImg(["snapshot", "-l", "a.qcow2"], cwd: dir).out
            let isNew = op == "create" ? list.contains(" s1 ") && list.contains(" s0 ") : op == "delete" && list.isEmpty
            #expect(list == oldList || isNew, "\(label): list\n\(list)")
            try Runner.qemuStep(["qemu-img", "check", "-q", "-r", "all", "a.qcow2"], in: dir)
            try expectCheckClean("a.qcow2", dir, "\(label), after check -r all")
            if list.contains(" s0 ") {
                try Runner.qemuStep(["qemu-img", "snapshot", "-a", "s0", "a.qcow2"], in: dir)
                try Self.expectData(dir, Self.original, "\(label): snapshot s0 applied")
            }
            n += 1
        }
    }

    /// An image another process holds (qemu-io, write lock): every action refused, the file
    /// unchanged; `-l -U` still lists. qimg says who holds the image (qemu-img: "Failed to
    /// get ... lock"), as its other commands do.
    @Test func lockedImageRefused() throws {
        let dir = try Self.makeImage(Self.kinds[0], "locked")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.step("qimg", ["snapshot", "-c", "s1", "a.qcow2"], in: dir)
        guard let qemuIO = Env.qemuIO else { throw TestFailure(Env.missingQEMUMessage) }
        let holder = try PipedProcess(qemuIO, ["a.qcow2"], cwd: dir)
        defer { holder.stop() }
        try holder.send("read 0 512\n")
        _ = try holder.waitForLine(containing: "read 512/512")
        let before = try FileState(dir + "/a.qcow2")
        for args in [["-c", "s2"], ["-a", "s1"], ["-d", "s1"], ["-l"]] {
            let all = ["snapshot"] + args + ["a.qcow2"]
            let (q, m) = try runBoth(all, cwd: dir)
            let label = all.joined(separator: " ")
            expectSameExit(label, qemu: q, qimg: m)
            expectCleanFailure(label, m, exitCode: 1)
            #expect(m.err.contains("in use by qemu-io"), "\(label): \(m.err)")
        }
        let (q, m) = try runBoth(["snapshot", "-l", "-U", "a.qcow2"], cwd: dir)
        expectSameExit("-l -U", qemu: q, qimg: m)
        expectSameStdout("-l -U", qemu: q, qimg: m)
        #expect(try FileState(dir + "/a.qcow2") == before, "the held image changed")
    }

    /// commit of an overlay with snapshots: the same result as qemu-img's (the snapshot
    /// keeps its data; the emptied overlays allocate alike).
    @Test func commitKeepsSnapshotsLikeQEMU() throws {
        let dir = try Paths.newScratch("snapshot-commit")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for c in [["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "8M"],
                  ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "a.qcow2"],
                  ["qemu-io", "-c", "write -P 1 0 1M", "a.qcow2"]] { try Runner.qemuStep(c, in: dir) }
        try Self.step("qimg", ["snapshot", "-c", "s1", "a.qcow2"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 2 0 64k", "a.qcow2"], in: dir)
        for f in ["base", "a"] { try FileManager.default.copyItem(atPath: "\(dir)/\(f).qcow2", toPath: "\(dir)/\(f)2.qcow2") }
        try Runner.qemuStep(["qemu-img", "rebase", "-u", "-b", "base2.qcow2", "-F", "qcow2", "a2.qcow2"], in: dir)
        try Self.step("qimg", ["commit", "a.qcow2"], in: dir)
        try Runner.qemuStep(["qemu-img", "commit", "a2.qcow2"], in: dir)
        for (x, y) in [("a", "a2"), ("base", "base2")] {
            let c = try Runner.qemuImg(["compare", "\(x).qcow2", "\(y).qcow2"], cwd: dir)
            #expect(c.status == 0, "\(x) after qimg commit differs from qemu-img's: \(c.out)")
        }
        // What the emptied overlays still allocate themselves (host layouts in the bases
        // differ with the order each tool copies in).
        let (aq, am) = (try Runner.qemuIO(["-r", "-c", "alloc 0 8M", "a2.qcow2"], cwd: dir), try Runner.qemuIO(["-r", "-c", "alloc 0 8M", "a.qcow2"], cwd: dir))
        #expect(aq.out == am.out && aq.status == 0, "overlay allocation after commit\n\(aq.out)---\n\(am.out)")
        try Self.step("qimg", ["snapshot", "-a", "s1", "a.qcow2"], in: dir)
        try Self.expectData(dir, [(1, "0", "1M")], "the snapshot after commit")
    }

    /// A disk of size 0 has an empty L1 table: its snapshot names none (offset 0, as
    /// QEMU writes it) and nothing leaks; applying one after a resize gives size 0 back.
    @Test func emptyDisk() throws {
        let dir = try Paths.newScratch("snapshot-empty")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "0"], in: dir)
        try Self.step("qimg", ["snapshot", "-c", "s", "a.qcow2"], in: dir)
        try Self.step("qemu-img", ["resize", "a.qcow2", "1M"], in: dir)
        try Runner.qemuStep(["qemu-io", "-c", "write -P 1 0 64k", "a.qcow2"], in: dir)
        try Self.step("qimg", ["snapshot", "-a", "s", "a.qcow2"], in: dir)
        let info = try Runner.qemuImg(["info", "--output=json", "a.qcow2"], cwd: dir)
        #expect(info.out.contains("\"virtual-size\": 0,"), "\(info.out)")
        try Self.step("qimg", ["snapshot", "-d", "s", "a.qcow2"], in: dir)
    }

    /// A snapshot whose L1 table names an L2 table past the end of the file: applying or
    /// deleting it fails before anything is written (one line, the file byte-identical);
    /// creating a snapshot of the (sound) active image still works.
    @Test func damagedSnapshotTreeRefusedUnchanged() throws {
        let dir = try Self.makeImage(Self.kinds[0], "damaged-tree")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.step("qimg", ["snapshot", "-c", "s1", "a.qcow2"], in: dir)
        try Self.changeData("qimg", in: dir)
        let url = URL(fileURLWithPath: dir + "/a.qcow2")
        var d = try Data(contentsOf: url)
        func be(_ at: Int) -> Int { Int(d[at..<at + 8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }) }
        let l1 = be(be(64))  // the first snapshot entry's L1 table
        for i in 0..<8 { d[l1 + i] = [0, 0, 0, 0x10, 0, 0, 0, 0][i] }  // L2 table at 64 GiB
        try d.write(to: url)
        for args in [["snapshot", "-a", "s1", "a.qcow2"], ["snapshot", "-d", "s1", "a.qcow2"]] {
            let before = try FileState(dir + "/a.qcow2")
            let r = try Qimg.run(args, cwd: dir)
            let label = args.joined(separator: " ")
            expectCleanFailure(label, r, exitCode: 1)
            #expect(r.err.contains("beyond the end of the file"), "\(label): \(r.err)")
            #expect(try FileState(dir + "/a.qcow2") == before, "\(label): the file changed")
        }
        let r = try Qimg.run(["snapshot", "-c", "s2", "a.qcow2"], cwd: dir)
        #expect(r.status == 0, "create beside a damaged snapshot: \(r.err)")
        try Self.expectData(dir, Self.changed, "the active image")
    }
}
