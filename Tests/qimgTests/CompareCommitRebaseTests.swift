import Foundation
import Testing
import TestSupport

/// compare, commit and rebase against qemu-img 7.2: compare must print the same verdict
/// with the same exit status; commit and rebase, run by qemu-img on one copy of a chain
/// and by qimg on another, must leave images with the same guest content, the same
/// `qemu-img info` (apart from file names and sizes), and a clean `qemu-img check`.
@Suite struct CompareCommitRebaseTests {
    static func scratch(_ name: String) throws -> String { try Paths.newScratch("\(name)") }

    /// Runs a setup step (`qemu-img ...` or `qemu-io ...`), which must succeed.
    static func sh(_ args: [String], _ dir: String) throws {
        let r = try Runner.qemuStep(args, in: dir)
        guard !r.out.contains("failed") else { throw TestFailure("\(r.summary): \(r.out)\(r.err)") }
    }

    static func create(_ name: String, _ size: String? = nil, _ opts: [String] = []) -> [String] {
        ["qemu-img", "create", "-q", "-f", "qcow2"] + opts + [name] + (size.map { [$0] } ?? [])
    }

    static func overlay(_ name: String, on backing: String, _ size: String? = nil, _ opts: [String] = []) -> [String] {
        create(name, size, opts + ["-b", backing, "-F", "qcow2"])
    }

    static func io(_ name: String, _ cmds: String..., format: String? = nil) -> [String] {
        ["qemu-io"] + (format.map { ["-f", $0] } ?? []) + cmds.flatMap { ["-c", $0] } + [name]
    }

    /// `qemu-img info --output=json` without the lines that depend on the file itself.
    static func info(_ file: String, _ dir: String) throws -> String {
        let r = try Runner.qemuImg(["info", "--output=json", file], cwd: dir)
        return r.out.split(separator: "\n")
            .filter { !$0.contains("\"filename\"") && !$0.contains("\"actual-size\"") }
            .joined(separator: "\n")
    }

    /// The first line of an error without the program name.
    static func message(_ r: RunResult) -> String {
        let line = r.stderrLines.first { $0.hasPrefix("qemu-img: ") || $0.hasPrefix("qimg: ") } ?? ""
        return String(line.drop { $0 != " " }.dropFirst())
    }

    // MARK: - compare

    @Test(.requiresQEMU) func compareMatchesQemuImg() throws {
        let dir = try Self.scratch("compare")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for step in [
            Self.create("a", "4M"), Self.io("a", "write -P 0x11 0 1M"),
            // The same content, another layout (strict mode sees different block status).
            Self.create("a2", "4M"), Self.io("a2", "write -P 0x11 512k 512k", "write -P 0x11 0 512k"),
            // One byte differs, at an unaligned offset.
            Self.create("b", "4M"), Self.io("b", "write -P 0x11 0 1M", "write -P 0x12 700001 1"),
            Self.create("b2", "4M"), Self.io("b2", "write -P 0x11 0 1M", "write -P 0x12 2500001 3"),
            // Larger: zeros in the tail, then a nonzero byte there.
            Self.create("big", "8M"), Self.io("big", "write -P 0x11 0 1M", "write -z 6M 64k"),
            Self.create("bigd", "8M"), Self.io("bigd", "write -P 0x11 0 1M", "write -P 9 5242883 1"),
            ["qemu-img", "convert", "-O", "raw", "a", "a.raw"],
            ["qemu-img", "convert", "-O", "raw", "b", "b.raw"],
            Self.create("e", "4M"),
            Self.create("z", "4M"), Self.io("z", "write -z 0 64k", "write -P 0 1M 64k"),
            Self.create("c", "4M"), Self.io("c", "write -c -P 0x11 0 1M"),
            Self.create("x", "4M", ["-o", "extended_l2=on,cluster_size=128k"]), Self.io("x", "write -P 0x11 0 1M", "write -z 8k 8k"),
            Self.create("y", "4M"), Self.io("y", "write -P 0x11 0 1M", "write -z 8k 8k"),
            // A backing file shorter than its overlay: zeros past its end.
            Self.create("base", "2M"), Self.io("base", "write -P 0x11 0 1M"),
            Self.overlay("ov", on: "base", "4M"), Self.overlay("ov2", on: "base", "4M"),
            Self.io("ov2", "write -P 0x11 512k 64k", "write -z 3M 64k"),
        ] { try Self.sh(step, dir) }
        let pairs = [("a", "a2"), ("a", "b"), ("b", "a"), ("a", "b2"), ("a", "big"), ("big", "a"), ("a", "bigd"),
                     ("bigd", "big"), ("e", "z"), ("z", "e"), ("a", "c"), ("c", "a"), ("x", "y"), ("y", "x"),
                     ("a", "a.raw"), ("a.raw", "a"), ("b.raw", "a"), ("e", "ov"), ("ov", "ov2"), ("ov2", "ov"),
                     ("ov", "a"), ("ov2", "big"), ("e", "e")]
        var cases: [[String]] = []
        for (p, q) in pairs { cases += [[p, q], ["-s", p, q]] }
        cases += [["-f", "raw", "-F", "qcow2", "a.raw", "a"], ["-f", "qcow2", "-F", "raw", "b", "b.raw"],
                  ["-F", "raw", "a", "a"], ["-f", "raw", "a.raw", "b"], ["-q", "a", "b"], ["-q", "a", "a2"],
                  ["-U", "a", "a2"], ["-s", "-q", "a", "big"]]
        for args in cases {
            let (q, m) = try runBoth(["compare"] + args, cwd: dir)
            #expect(m.status == q.status, "compare \(args): qemu \(q.status), qimg \(m.status) \(m.err)")
            #expect(m.out == q.out, "compare \(args): qemu '\(q.out)', qimg '\(m.out)'")
        }
        // qemu-img reports the start of the first differing 512-byte block.
        #expect(try Qimg.run(["compare", "a", "b"], cwd: dir).out == "Content mismatch at offset 699904!\n")
    }

    @Test(.requiresQEMU) func compareErrors() throws {
        let dir = try Self.scratch("compare-err")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.sh(Self.create("a", "1M"), dir)
        try Self.sh(["qemu-img", "convert", "-O", "raw", "a", "a.raw"], dir)
        for args in [["a", "missing"], ["-f", "qcow2", "a.raw", "a"], ["-F", "vmdk", "a", "a"], ["a"], ["a", "a", "a"]] {
            let (q, m) = try runBoth(["compare"] + args, cwd: dir)
            #expect(m.status == q.status, "compare \(args): qemu \(q.status) \(q.err), qimg \(m.status) \(m.err)")
            #expect(m.out.isEmpty && m.stderrLines.count == 1, "compare \(args): \(m.out)\(m.err)")
        }
        let usage = try Qimg.run(["compare", "a"], cwd: dir)
        #expect(Self.message(usage) == "Expecting two image file names")
    }

    /// A cluster that cannot be read (a compressed cluster whose stream is garbage) stops
    /// the comparison with qemu-img's exit status 4 and one line naming the file.
    @Test(.requiresQEMU) func compareReadError() throws {
        let dir = try Self.scratch("compare-readerr")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.sh(Self.create("c", "1M"), dir)
        try Self.sh(Self.io("c", "write -c -P 0x11 0 64k"), dir)
        try Self.sh(Self.create("e", "1M"), dir)
        // The compressed stream is the last thing written, from a cluster boundary on:
        // 0xFF is an invalid deflate block type.
        let fd = open(dir + "/c", O_RDWR)
        try #require(fd >= 0)
        let end = lseek(fd, 0, SEEK_END)
        let start = (end - 1) / 65536 * 65536
        let junk = [UInt8](repeating: 0xFF, count: Int(end - start))
        #expect(pwrite(fd, junk, junk.count, start) == junk.count)
        close(fd)
        for args in [["c", "e"], ["e", "c"]] {
            let (q, m) = try runBoth(["compare"] + args, cwd: dir)
            #expect(q.status == 4, "qemu-img compare \(args): \(q.status) \(q.err)")
            #expect(m.status == q.status, "compare \(args): qemu \(q.status) \(q.err), qimg \(m.status) \(m.err)")
            #expect(m.out.isEmpty && m.stderrLines.count == 1 && m.err.hasPrefix("qimg: c: "), "compare \(args): \(m.out)\(m.err)")
        }
    }

    // MARK: - commit and rebase scenarios

    struct Scenario: Sendable, CustomTestStringConvertible {
        var name: String
        var setup: [[String]]
        var args: [String]
        /// The images to compare afterwards.
        var files: [String]
        var testDescription: String { "\(name): \(args.joined(separator: " "))" }
    }

    /// Sets up `s` in dir/q, copies it to dir/m, runs `command` with qemu-img in q and
    /// with qimg in m, and checks that the results agree. Returns the directory.
    @discardableResult
    static func runScenario(_ command: String, _ s: Scenario, before: (String) throws -> Void = { _ in }) throws -> (dir: String, qemu: RunResult, qimg: RunResult) {
        let dir = try scratch(command)
        let q = dir + "/q", m = dir + "/m"
        try FileManager.default.createDirectory(atPath: q, withIntermediateDirectories: true)
        for step in s.setup { try sh(step, q) }
        try before(q)
        try FileManager.default.copyItem(atPath: q, toPath: m)
        let qr = try Runner.qemuImg([command] + s.args, cwd: q)
        let mr = try Qimg.run([command] + s.args, cwd: m)
        let label = "\(command) \(s.testDescription)"
        #expect(mr.status == qr.status, "\(label): qemu \(qr.status) \(qr.err), qimg \(mr.status) \(mr.err)")
        #expect(mr.out == qr.out, "\(label): stdout qemu '\(qr.out)', qimg '\(mr.out)'")
        if qr.status != 0 {
            #expect(message(mr) == message(qr), "\(label): qemu '\(qr.err)', qimg '\(mr.err)'")
            return (dir, qr, mr)
        }
        for f in s.files {
            let c = try Runner.qemuImg(["compare", "-U", "q/" + f, "m/" + f], cwd: dir)
            #expect(c.status == 0, "\(label): \(f) differs: \(c.out)\(c.err)")
            #expect(try info(f, m) == (try info(f, q)), "\(label): info of \(f) differs")
            let check = try Runner.qemuImg(["check", f], cwd: m)
            #expect(check.status == 0 || check.status == 63, "\(label): check \(f): \(check.out)\(check.err)")
        }
        return (dir, qr, mr)
    }

    static let commitBase: [[String]] = [
        create("base", "4M"), io("base", "write -P 0x11 0 4M"),
        overlay("top", on: "base"), io("top", "write -P 0x22 100k 200k", "write -z 1M 128k", "discard 2M 64k"),
    ]
    static let threeLayers: [[String]] = [
        create("base", "4M"), io("base", "write -P 1 0 4M"),
        overlay("mid", on: "base"), io("mid", "write -P 2 1M 1M"),
        overlay("top", on: "mid"), io("top", "write -P 3 1536k 1M", "write -z 3M 64k"),
    ]

    static let commitScenarios: [Scenario] = [
        Scenario(name: "overlay", setup: commitBase, args: ["top"], files: ["base", "top"]),
        Scenario(name: "keep top", setup: commitBase, args: ["-d", "top"], files: ["base", "top"]),
        Scenario(name: "explicit base", setup: commitBase, args: ["-b", "base", "top"], files: ["base", "top"]),
        Scenario(name: "quiet", setup: commitBase, args: ["-q", "top"], files: ["base", "top"]),
        Scenario(name: "base grows", setup: [
            create("base", "1M"), io("base", "write -P 1 0 1M"),
            overlay("top", on: "base", "4M"), io("top", "write -P 2 2M 64k", "write -P 3 512 1000"),
        ], args: ["top"], files: ["base", "top"]),
        Scenario(name: "raw base", setup: [
            ["qemu-img", "create", "-q", "-f", "raw", "base", "4M"], io("base", "write -P 1 0 3M", format: "raw"),
            create("top", nil, ["-b", "base", "-F", "raw"]), io("top", "write -P 5 1M 1M", "write -z 0 64k"),
        ], args: ["top"], files: ["base", "top"]),
        Scenario(name: "subclusters and compressed clusters", setup: [
            create("base", "4M", ["-o", "cluster_size=4k"]), io("base", "write -P 1 0 4M"),
            overlay("top", on: "base", nil, ["-o", "extended_l2=on"]),
            io("top", "write -P 7 5k 3k", "write -z 64k 4k", "write -c -P 8 1M 64k"),
        ], args: ["top"], files: ["base", "top"]),
        Scenario(name: "three layers", setup: threeLayers, args: ["top"], files: ["base", "mid", "top"]),
        Scenario(name: "three layers, deep base", setup: threeLayers, args: ["-b", "base", "top"], files: ["base", "mid", "top"]),
        Scenario(name: "three layers, middle", setup: threeLayers, args: ["-b", "mid", "top"], files: ["base", "mid", "top"]),
        Scenario(name: "version 2", setup: [
            create("base", "4M", ["-o", "compat=0.10"]), io("base", "write -P 1 0 4M"),
            overlay("top", on: "base", nil, ["-o", "compat=0.10"]), io("top", "write -P 2 0 64k", "write -z 1M 1M"),
        ], args: ["top"], files: ["base", "top"]),
        Scenario(name: "internal snapshot in top", setup: [
            create("base", "4M"), io("base", "write -P 1 0 4M"),
            overlay("top", on: "base"), io("top", "write -P 2 0 1M"),
            ["qemu-img", "snapshot", "-c", "snap", "top"], io("top", "write -P 3 512k 1M"),
        ], args: ["top"], files: ["base", "top"]),
        Scenario(name: "bitmaps", setup: [
            create("base", "4M"), ["qemu-img", "bitmap", "--add", "base", "bb"], io("base", "write -P 1 0 4M"),
            overlay("top", on: "base"), ["qemu-img", "bitmap", "--add", "top", "tb"], io("top", "write -P 2 1M 64k"),
        ], args: ["top"], files: ["base", "top"]),
        Scenario(name: "empty top", setup: [create("base", "4M"), overlay("top", on: "base")], args: ["top"], files: ["base", "top"]),
        Scenario(name: "no backing file", setup: [create("base", "4M")], args: ["base"], files: []),
        Scenario(name: "raw image", setup: commitBase, args: ["-f", "raw", "top"], files: []),
        Scenario(name: "base not in chain", setup: threeLayers, args: ["-b", "nope", "top"], files: []),
        Scenario(name: "base is the image", setup: threeLayers, args: ["-b", "top", "top"], files: []),
    ]

    @Test(.requiresQEMU, arguments: commitScenarios)
    func commitMatchesQemuImg(_ s: Scenario) throws {
        let (dir, q, _) = try Self.runScenario("commit", s)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        if q.status == 0 && s.args == ["top"] {
            // Emptied like qemu-img's: nothing allocated in the top any more.
            let map = try Runner.qemuImg(["map", "--output=json", "top"], cwd: dir + "/m").out
            #expect(!map.contains("\"depth\": 0"), "\(s.name): \(map)")
        }
    }

    static let rebaseBackings: [[String]] = [
        create("old", "4M"), io("old", "write -P 0x11 0 2M"),
        create("new", "4M"), io("new", "write -P 0x11 0 1M", "write -P 0x33 1M 100k", "write -P 0x44 3M 512"),
    ]
    static let rebaseTop = rebaseBackings + [overlay("top", on: "old"), io("top", "write -P 0x22 1M 64k")]

    static let rebaseScenarios: [Scenario] = [
        Scenario(name: "safe", setup: rebaseTop, args: ["-b", "new", "-F", "qcow2", "top"], files: ["top"]),
        Scenario(name: "remove backing", setup: rebaseTop, args: ["-b", "", "top"], files: ["top"]),
        Scenario(name: "unsafe", setup: rebaseTop, args: ["-u", "-b", "new", "-F", "qcow2", "top"], files: ["top"]),
        Scenario(name: "unsafe, remove", setup: rebaseTop, args: ["-u", "top"], files: ["top"]),
        Scenario(name: "unsafe, empty name", setup: rebaseTop, args: ["-u", "-b", "", "-F", "qcow2", "top"], files: ["top"]),
        Scenario(name: "quiet", setup: rebaseTop, args: ["-q", "-b", "new", "-F", "qcow2", "top"], files: ["top"]),
        Scenario(name: "no old backing", setup: rebaseBackings + [create("top", "4M"), io("top", "write -P 0x22 1M 64k")],
                 args: ["-b", "new", "-F", "qcow2", "top"], files: ["top"]),
        Scenario(name: "version 2", setup: rebaseBackings + [overlay("top", on: "old", nil, ["-o", "compat=0.10"]), io("top", "write -P 0x22 1M 64k")],
                 args: ["-b", "new", "-F", "qcow2", "top"], files: ["top"]),
        Scenario(name: "version 2, remove", setup: rebaseBackings + [overlay("top", on: "old", nil, ["-o", "compat=0.10"]), io("top", "write -P 0x22 1M 64k")],
                 args: ["-b", "", "top"], files: ["top"]),
        Scenario(name: "subclusters", setup: rebaseBackings + [overlay("top", on: "old", nil, ["-o", "extended_l2=on"]), io("top", "write -P 0x22 1M 4k", "write -z 2M 8k")],
                 args: ["-b", "new", "-F", "qcow2", "top"], files: ["top"]),
        Scenario(name: "512-byte clusters", setup: rebaseBackings + [overlay("top", on: "old", nil, ["-o", "cluster_size=512"]), io("top", "write -P 0x22 1M 64k")],
                 args: ["-b", "new", "-F", "qcow2", "top"], files: ["top"]),
        Scenario(name: "backing sizes differ", setup: [
            create("old", "1M"), io("old", "write -P 1 0 1M"), create("new", "2M"), io("new", "write -P 2 0 2M"),
            overlay("top", on: "old", "4M"), io("top", "write -P 3 3M 64k"),
        ], args: ["-b", "new", "-F", "qcow2", "top"], files: ["top"]),
        Scenario(name: "raw new backing", setup: rebaseBackings + [["qemu-img", "convert", "-O", "raw", "new", "newr"], overlay("top", on: "old")],
                 args: ["-b", "newr", "-F", "raw", "top"], files: ["top"]),
        Scenario(name: "onto the grandparent", setup: rebaseBackings + [
            overlay("mid", on: "old"), io("mid", "write -P 9 100k 1M"), overlay("top", on: "mid"), io("top", "write -P 0x22 1M 64k"),
        ], args: ["-b", "old", "-F", "qcow2", "top"], files: ["top"]),
        Scenario(name: "bitmaps", setup: rebaseBackings + [overlay("top", on: "old"), ["qemu-img", "bitmap", "--add", "top", "b1"], io("top", "write -P 0x22 1M 64k")],
                 args: ["-b", "new", "-F", "qcow2", "top"], files: ["top"]),
        Scenario(name: "no backing format", setup: rebaseTop, args: ["-b", "new", "top"], files: []),
        Scenario(name: "no backing file", setup: rebaseTop, args: ["top"], files: []),
        Scenario(name: "raw image", setup: rebaseTop + [["qemu-img", "convert", "-O", "raw", "top", "top.raw"]],
                 args: ["-f", "raw", "-b", "old", "-F", "qcow2", "top.raw"], files: []),
    ]

    @Test(.requiresQEMU, arguments: rebaseScenarios)
    func rebaseMatchesQemuImg(_ s: Scenario) throws {
        let safe = !s.args.contains("-u")
        let (dir, q, m) = try Self.runScenario("rebase", s) { q in
            if safe { try Self.sh(["qemu-img", "convert", "-O", "raw", "top", "before.raw"], q) }
        }
        defer { try? FileManager.default.removeItem(atPath: dir) }
        if safe && q.status == 0 {
            // Safe mode keeps the guest view.
            let c = try Runner.qemuImg(["compare", "-f", "raw", "m/before.raw", "m/top"], cwd: dir)
            #expect(c.status == 0, "\(s.name): \(c.out)\(c.err)")
        }
        if m.status != 0 {
            // A refused rebase changes nothing.
            let before = try Data(contentsOf: URL(fileURLWithPath: dir + "/q/top"))
            #expect(try Data(contentsOf: URL(fileURLWithPath: dir + "/m/top")) == before || s.name == "no backing format")
        }
    }

    /// qemu-img 7.2 loses zeros when it rebases a version 2 image without a backing file
    /// (its zero writes are no-ops there); qimg writes them, so the guest view is kept.
    @Test(.requiresQEMU) func rebaseOfVersion2ImageKeepsZeros() throws {
        let dir = try Self.scratch("rebase-v2")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        for step in [
            Self.create("new", "4M"), Self.io("new", "write -P 0x11 0 1M", "write -P 0x44 3M 512"),
            Self.create("top", "4M", ["-o", "compat=0.10"]), Self.io("top", "write -P 0x22 1M 64k"),
            ["qemu-img", "convert", "-O", "raw", "top", "before.raw"],
        ] { try Self.sh(step, dir) }
        let r = try Qimg.run(["rebase", "-b", "new", "-F", "qcow2", "top"], cwd: dir)
        #expect(r.status == 0, "\(r.err)")
        #expect(try Runner.qemuImg(["compare", "-f", "raw", "before.raw", "top"], cwd: dir).status == 0)
        #expect(try Self.info("top", dir).contains("\"backing-filename\": \"new\""))
        try expectCheckClean("top", dir, "top")
    }
}
