// Backup repositories (issue 14): qimg deletes only its own leftovers (temporary files and
// the point file of a killed backup, the files a prune expired); any other qcow2 file of the
// repository that is not a listed point (an orphan whose parent is gone, a file of an unknown
// chain, a file a person copied in) is kept, listed and reported by verify as damage, while
// backups go on. QEMU's tools are the oracles: qemu-io writes, qemu-img convert saves each
// day's disk, qemu-img compare judges what the files and restores read.

import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

@Suite struct RepositoryOrphanTests {
    typealias B = BackupTests
    typealias R = RepositoryTests

    /// `days` daily backups of a 4 MiB image, day N's disk saved as dayN.qcow2: the points.
    static func days(_ dir: String, _ range: ClosedRange<Int>) throws -> [[String: Any]] {
        if range.lowerBound == 1 { try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir) }
        for day in range {
            try B.tool(["qemu-io", "-c", "write -P \(day) \(day * 256)k 100k", "vm.qcow2"], dir)
            try B.tool(["qemu-img", "convert", "-O", "qcow2", "vm.qcow2", "day\(day).qcow2"], dir)
            try R.backup(dir, day: day)
        }
        return try R.points(dir)
    }

    static func file(_ p: [String: Any]) -> String { "R/" + (p["file"] as? String ?? "?") }
    static func name(_ p: [String: Any]) -> String { String(file(p).split(separator: "/").last ?? "?") }
    static func ids(_ dir: String) throws -> [String] { try R.points(dir).map { $0["id"] as? String ?? "?" } }

    /// The `orphans` (or `leftovers`) of image `image` in `repo list --output=json`: file -> reason.
    static func unlisted(_ dir: String, _ key: String = "orphans", image: String = "vm.qcow2") throws -> [String: String] {
        let i = try R.list(dir).first { $0["image"] as? String == image }
        let entries = i?[key] as? [[String: Any]] ?? []
        return Dictionary(entries.map { ($0["file"] as? String ?? "?", $0["reason"] as? String ?? "?") }) { a, _ in a }
    }

    /// The contents of the given files (which must exist).
    static func contents(_ dir: String, _ files: [String]) throws -> [Data] { try files.map { try B.bytes(dir, $0) } }

    /// verify exits 2, and for each (file, reason) one line names the file and the reason.
    static func expectVerifyNames(_ dir: String, _ expected: [(String, String)], _ label: String,
                                  sourceLocation: SourceLocation = #_sourceLocation) throws {
        let v = try Qimg.run(["repo", "verify", "R"], cwd: dir)
        #expect(v.status == 2, "\(label): verify: \(v.summary): \(v.err)", sourceLocation: sourceLocation)
        for (f, reason) in expected {
            #expect(v.stderrLines.contains { $0.contains(f) && $0.contains(reason) }, "\(label): verify names \(f) (\(reason)): \(v.err)",
                    sourceLocation: sourceLocation)
        }
    }

    /// The manifest lost while a middle point's file is away (moved out by a person): the
    /// rebuilt list leaves out the points above it but keeps their files, lists them as
    /// orphans (parent missing), verify reports each (exit 2), and the next backup (a full)
    /// deletes none of them. With the file back and the manifest rebuilt again, every point
    /// restores its day's disk and the chain goes on.
    @Test(.requiresQEMU) func lostManifestKeepsPointsAboveAMissingFile() throws {
        let dir = try R.scratch("orphans-moved")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let pts = try Self.days(dir, 1...4)
        let (f2, f3, f4) = (Self.file(pts[1]), Self.file(pts[2]), Self.file(pts[3]))
        try FileManager.default.moveItem(atPath: dir + "/" + f2, toPath: dir + "/aside.qcow2")
        unlink(dir + "/R/qimg-repository.json")
        let kept = try Self.contents(dir, [f3, f4])

        #expect(try Self.ids(dir) == ["000001"])
        let orphans = try Self.unlisted(dir)
        #expect(orphans == [String(f3.dropFirst(2)): "parent \(Self.name(pts[1])) missing",
                            String(f4.dropFirst(2)): "parent \(Self.name(pts[2])) is not a restore point"], "\(orphans)")
        let human = try B.qimg(["repo", "list", "R"], dir).out
        #expect(human.contains(String(f3.dropFirst(2))) && human.contains("parent \(Self.name(pts[1])) missing"), "\(human)")
        try Self.expectVerifyNames(dir, [(f3, "parent \(Self.name(pts[1])) missing"), (f4, "parent \(Self.name(pts[2]))")], "rebuilt")

        // Backups go on (a full: the image's bitmap is of a point the list lacks); nothing is deleted.
        try B.tool(["qemu-io", "-c", "write -P 5 1280k 100k", "vm.qcow2"], dir)
        try B.tool(["qemu-img", "convert", "-O", "qcow2", "vm.qcow2", "day5.qcow2"], dir)
        let full = try R.backup(dir, day: 5)
        #expect(full["kind"] as? String == "full" && full["id"] as? String == "000005", "\(full)")
        #expect(try Self.contents(dir, [f3, f4]) == kept, "the orphans are kept, unchanged")
        #expect(try Self.ids(dir) == ["000001", "000005"])
        #expect(try Self.unlisted(dir).count == 2)
        #expect(try Qimg.run(["repo", "verify", "R", "--point", "000005"], cwd: dir).status == 0)

        // The file back: the chain it heads reads as its days again; a rebuild lists it all.
        try FileManager.default.moveItem(atPath: dir + "/aside.qcow2", toPath: dir + "/" + f2)
        try B.expectIdentical(f4, "day4.qcow2", dir, "the orphan's chain with its file back")
        unlink(dir + "/R/qimg-repository.json")
        #expect(try Self.ids(dir) == ["000001", "000002", "000003", "000004", "000005"])
        #expect(try Self.unlisted(dir).isEmpty)
        for day in 1...5 { try R.expectRestores(dir, point: String(format: "%06d", day), as: "day\(day).qcow2", "rebuilt again") }
        try B.tool(["qemu-io", "-c", "write -P 6 0 64k", "vm.qcow2"], dir)
        let next = try R.backup(dir, day: 6)
        #expect(next["kind"] as? String == "incremental" && next["parent"] as? String == "000005", "\(next)")
        try R.expectRestores(dir, point: "000006", as: "vm.qcow2", "the chain goes on")
        try R.expectRepositoryClean(dir, "everything back")
    }

    /// A middle point's file lost for good with the manifest: prune merges the listed points
    /// and leaves the orphans above the gap as they were; verify reports them, the listed
    /// points restore their days, and a backup after it deletes nothing either.
    @Test(.requiresQEMU) func pruneLeavesOrphansInTheMiddle() throws {
        let dir = try R.scratch("orphans-prune")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let pts = try Self.days(dir, 1...5)
        let orphans = [Self.file(pts[3]), Self.file(pts[4])]
        unlink(dir + "/" + Self.file(pts[2]))
        unlink(dir + "/R/qimg-repository.json")
        let kept = try Self.contents(dir, orphans)
        #expect(try Self.ids(dir) == ["000001", "000002"])

        let r = try RepositoryPruneTests.prune(dir, ["--keep", "1"])
        #expect(r["removed"] as? [String] == ["000001"], "\(r)")
        #expect(!B.exists(dir, Self.file(pts[0])), "the expired point's file is removed")
        #expect(try Self.contents(dir, orphans) == kept, "the orphans are kept, unchanged")
        try R.expectRestores(dir, point: "000002", as: "day2.qcow2", "after the prune")
        try B.qimg(["repo", "restore", "R", "--point", "000002", "-O", "qcow2", "restored.qcow2"], dir)
        try expectCheckClean("restored.qcow2", dir, "the restore after the prune")
        try B.expectIdentical("restored.qcow2", "day2.qcow2", dir, "the restore after the prune")
        #expect(try Qimg.run(["repo", "verify", "R", "--point", "000002"], cwd: dir).status == 0)
        try Self.expectVerifyNames(dir, [(orphans[0], "parent \(Self.name(pts[2])) missing"),
                                         (orphans[1], "parent \(Self.name(pts[3])) is not a restore point")], "after the prune")

        try B.tool(["qemu-io", "-c", "write -P 6 0 64k", "vm.qcow2"], dir)
        let next = try R.backup(dir, day: 6)
        #expect(next["kind"] as? String == "full", "\(next)")
        try R.expectRestores(dir, point: next["id"] as? String ?? "?", as: "vm.qcow2", "after the prune")
        #expect(try Self.contents(dir, orphans) == kept, "the orphans are kept after a backup")
        try RepositoryPruneTests.prune(dir, ["--keep", "1"])
        #expect(try Self.contents(dir, orphans) == kept, "the orphans are kept after a second prune")
        #expect(try Self.ids(dir) == [next["id"] as? String ?? "?"])
    }

    /// The manifest present, a middle point's file deleted: verify names the point
    /// ("missing") and the point above it; the next backup is a full and deletes nothing;
    /// a prune whose merge would read the missing file stops with exit 2 before any change;
    /// one that needs no merge goes on.
    @Test(.requiresQEMU) func listedPointWithoutItsFile() throws {
        let dir = try R.scratch("orphans-listed")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let pts = try Self.days(dir, 1...3)
        unlink(dir + "/" + Self.file(pts[1]))
        let v = try Qimg.run(["repo", "verify", "R"], cwd: dir)
        #expect(v.status == 2, "\(v.summary): \(v.err)")
        #expect(v.stderrLines.contains { $0.contains(Self.file(pts[1])) && $0.contains("point 000002") && $0.contains("missing") }, "\(v.err)")
        #expect(v.stderrLines.contains { $0.contains("point 000003") && $0.contains(Self.name(pts[1])) }, "\(v.err)")

        let before = try FileManager.default.contentsOfDirectory(atPath: dir + "/R/vm.qcow2").sorted()
        try B.tool(["qemu-io", "-c", "write -P 4 0 64k", "vm.qcow2"], dir)
        let full = try R.backup(dir, day: 4)
        #expect(full["kind"] as? String == "full" && full["full-reason"] as? String == "newest point missing or replaced", "\(full)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/R/vm.qcow2").sorted() == (before + [Self.name(full)]).sorted())
        #expect(try Self.ids(dir) == ["000001", "000002", "000003", "000004"])
        try R.expectRestores(dir, point: "000004", as: "vm.qcow2", "the full")
        try R.expectRestores(dir, point: "000001", as: "day1.qcow2", "the first point")

        let tree = try FileManager.default.subpathsOfDirectory(atPath: dir + "/R").sorted()
        let manifest = try B.bytes(dir, "R/qimg-repository.json")
        let p = try Qimg.run(["repo", "prune", "R", "--keep", "2"], cwd: dir)
        #expect(p.status == 2 && p.stderrLines.count == 1 && p.err.contains("000002") && p.err.contains("missing"), "\(p.summary): \(p.err)")
        #expect(try FileManager.default.subpathsOfDirectory(atPath: dir + "/R").sorted() == tree)
        #expect(try B.bytes(dir, "R/qimg-repository.json") == manifest)

        try RepositoryPruneTests.prune(dir, ["--keep", "1"])
        #expect(try Self.ids(dir) == ["000004"])
        try R.expectRepositoryClean(dir, "after the prune")
    }

    /// What qimg never made or made and forgot: a qcow2 a person copied into a chain, a copy
    /// of a point under another name, a chain directory the manifest does not know, a qcow2
    /// beside the manifest. Each is listed (its image: the directory; the last: at the top),
    /// verify reports it, and backups and prunes keep it.
    @Test(.requiresQEMU) func filesAPersonPutInAreKept() throws {
        let dir = try R.scratch("orphans-copied")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let pts = try Self.days(dir, 1...3)
        try R.shell("cp day1.qcow2 R/vm.qcow2/mine.qcow2 && cp \(Self.file(pts[1])) R/vm.qcow2/copy.qcow2", dir)
        try R.shell("mkdir R/old.qcow2 && cp \(Self.file(pts[0])) R/old.qcow2/\(Self.name(pts[0]))", dir)
        try R.shell("cp day2.qcow2 R/top.qcow2", dir)
        let added = ["R/vm.qcow2/mine.qcow2", "R/vm.qcow2/copy.qcow2", "R/old.qcow2/" + Self.name(pts[0]), "R/top.qcow2"]
        let kept = try Self.contents(dir, added)
        #expect(try Self.unlisted(dir) == ["vm.qcow2/mine.qcow2": "not listed in the manifest",
                                          "vm.qcow2/copy.qcow2": "not listed in the manifest"])
        #expect(try Self.unlisted(dir, image: "old.qcow2") == ["old.qcow2/" + Self.name(pts[0]): "not listed in the manifest (no chain 'old.qcow2')"])
        #expect(try R.list(dir).first { $0["image"] as? String == "old.qcow2" }?["points"] as? [Any] != nil)
        let listing = try JSONSerialization.jsonObject(with: try B.qimg(["repo", "list", "--output=json", "R"], dir).stdout) as? [String: Any]
        let outside = listing?["orphans"] as? [[String: Any]] ?? []
        #expect(outside.map { "\($0["file"] ?? "-"): \($0["reason"] ?? "-")" } == ["top.qcow2: not in a chain directory"], "\(outside)")
        try Self.expectVerifyNames(dir, added.dropLast().map { ($0, "not listed in the manifest") } + [("R/top.qcow2", "not in a chain directory")], "copied in")

        try B.tool(["qemu-io", "-c", "write -P 4 0 64k", "vm.qcow2"], dir)
        #expect(try R.backup(dir, day: 4)["kind"] as? String == "incremental")
        try RepositoryPruneTests.prune(dir, ["--keep", "2"])
        #expect(try Self.contents(dir, added) == kept)
        try R.expectRestores(dir, point: "000004", as: "vm.qcow2", "beside the copied files")
    }

    /// A backup killed after its file was durable, before the manifest recorded it (the
    /// state is made by putting back the manifest and the image of before a run): the file is
    /// a leftover, not damage (list shows it, verify passes), and the next backup removes it
    /// and takes the incremental again. The manifest put back alone (the image kept the run's
    /// bitmap: the run completed) keeps the file as an orphan, and the next backup is a full.
    @Test(.requiresQEMU) func killedBackupsFileIsALeftover() throws {
        let dir = try R.scratch("orphans-killed")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        _ = try Self.days(dir, 1...2)
        try B.tool(["qemu-io", "-c", "write -P 3 0 64k", "vm.qcow2"], dir)
        try R.shell("cp -a R/qimg-repository.json manifest.before && cp -a vm.qcow2 vm.before", dir)
        let third = try R.backup(dir, day: 3)
        try R.shell("cp -a manifest.before R/qimg-repository.json && cp -a vm.before vm.qcow2", dir)
        #expect(try Self.unlisted(dir, "leftovers").keys.sorted() == [third["file"] as? String ?? "?"])
        #expect(try Self.unlisted(dir).isEmpty)
        let v = try Qimg.run(["repo", "verify", "R"], cwd: dir)
        #expect(v.status == 0, "a leftover is not damage: \(v.err)")
        let again = try R.backup(dir, day: 3, at: "2026-01-03T03:00:00Z")
        #expect(again["kind"] as? String == "incremental" && again["parent"] as? String == "000002", "\(again)")
        #expect(!B.exists(dir, Self.file(third)), "the killed run's file is removed")
        try R.expectRestores(dir, point: again["id"] as? String ?? "?", as: "vm.qcow2", "the run again")

        try R.shell("cp -a R/qimg-repository.json manifest.before", dir)
        try B.tool(["qemu-io", "-c", "write -P 4 64k 64k", "vm.qcow2"], dir)
        let fourth = try R.backup(dir, day: 4)
        try R.shell("cp -a manifest.before R/qimg-repository.json && cp -a vm.qcow2 vm.day4", dir)
        try B.tool(["qemu-io", "-c", "write -P 5 128k 64k", "vm.qcow2"], dir)
        // The run had switched the image's bitmap to its point: the next backup records the
        // file as a point and takes its incremental on it.
        let fifth = try R.backup(dir, day: 5)
        #expect(fifth["kind"] as? String == "incremental" && fifth["parent"] as? String == fourth["id"] as? String, "\(fifth)")
        #expect(B.exists(dir, Self.file(fourth)), "a completed run's file is kept")
        #expect(try Self.unlisted(dir).isEmpty && Self.unlisted(dir, "leftovers").isEmpty)
        try R.expectRestores(dir, point: fourth["id"] as? String ?? "?", as: "vm.day4", "the recorded point")
        try R.expectRestores(dir, point: fifth["id"] as? String ?? "?", as: "vm.qcow2", "the incremental on it")
    }
}
