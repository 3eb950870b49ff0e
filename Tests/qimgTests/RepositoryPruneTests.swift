// `qimg repo prune` (issue 14, item 5): expired points merged into the next kept one,
// down into the full or up into the kept point, whichever copies less; crash-safe at every
// write and sync; a 30-day run restoring every point before and after every policy.
// QEMU's tools are the oracles: qemu-io writes, qemu-img convert saves each day's disk,
// qemu-img compare / check / map judge the points.

import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

@Suite struct RepositoryPruneTests {
    typealias B = BackupTests
    typealias R = RepositoryTests

    /// `qimg repo prune R ARGS --output=json`, which must succeed: its JSON.
    @discardableResult
    static func prune(_ dir: String, repo: String = "R", _ args: [String]) throws -> [String: Any] {
        let r = try B.qimg(["repo", "prune", repo, "--output=json"] + args, dir)
        return try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any] ?? [:]
    }

    static func ids(_ dir: String, repo: String = "R") throws -> [String] { try R.points(dir, repo: repo).map { $0["id"] as? String ?? "?" } }

    static func inode(_ path: String) -> UInt64 { var st = stat(); return stat(path, &st) == 0 ? UInt64(st.st_ino) : 0 }

    /// Six days, then `prune --keep 3`: the kept points keep their ids and restore what they
    /// restored before; the oldest kept becomes a full; verify passes; the next run is still
    /// an incremental on the newest point. Then --keep 1 on a chain whose newest is a full.
    @Test(.requiresQEMU) func pruneKeepsWhatItKeeps() throws {
        let dir = try R.scratch("prune")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.sixDays(dir)
        let before = try R.points(dir)
        let r = try B.qimg(["repo", "prune", "R", "--keep", "3"], dir)
        #expect(r.err.contains("from \(before[3]["id"] as? String ?? "?") on"), "\(r.err)")
        let after = try R.points(dir)
        #expect(after.map { $0["id"] as? String } == before.suffix(3).map { $0["id"] as? String })
        #expect(after.first?["kind"] as? String == "full" && after.first?["parent"] is NSNull)
        for (i, p) in after.enumerated() { try R.expectRestores(dir, point: p["id"] as? String ?? "?", as: "day\(i + 4).qcow2", "after prune") }
        try R.expectRepositoryClean(dir, "after prune")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/R/vm.qcow2").count == 3)
        try B.tool(["qemu-io", "-c", "write -P 7 3M 4k", "vm.qcow2"], dir)
        #expect(try R.backup(dir, day: 7)["kind"] as? String == "incremental")
        try B.qimg(["repo", "prune", "R", "--keep", "1"], dir)
        let last = try R.points(dir)
        #expect(last.count == 1 && last.first?["kind"] as? String == "full")
        try R.expectRestores(dir, point: last.first?["id"] as? String ?? "?", as: "vm.qcow2", "keep 1")
        try R.expectRepositoryClean(dir, "after keep 1")
        try B.tool(["qemu-io", "-c", "write -P 8 2M 4k", "vm.qcow2"], dir)
        let next = try R.backup(dir, day: 8)
        #expect(next["kind"] as? String == "incremental", "\(next)")
        try R.expectRestores(dir, point: next["id"] as? String ?? "?", as: "vm.qcow2", "after keep 1")
    }

    /// Ten daily points (2026-01-01, a Thursday, to 01-10), then --keep-daily 2
    /// --keep-weekly 2: days 4 (newest of the week Dec 29 - Jan 4), 9 and 10 stay; day 4
    /// becomes a full, day 9 an incremental on day 4 (merged up in place: same file, it
    /// gains day 5-8's clusters it lacked), day 10 is untouched; each restores its day's
    /// disk. Then --keep-monthly 1: day 10 alone.
    @Test(.requiresQEMU) func prunePoliciesKeepMiddlePoints() throws {
        let dir = try R.scratch("policy")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir)
        var ids: [Int: String] = [:]
        for day in 1...10 {
            try B.tool(["qemu-io", "-c", "write -P \(day) \(day * 200)k 100k", "-c", "write -P \(day + 20) \(day % 3 * 1024)k 64k", "vm.qcow2"], dir)
            try B.tool(["qemu-img", "convert", "-O", "qcow2", "vm.qcow2", "day\(day).qcow2"], dir)
            ids[day] = try R.backup(dir, day: day)["id"] as? String
        }
        let day9 = dir + "/R/" + (try R.points(dir)[8]["file"] as? String ?? "?")
        let inode9 = Self.inode(day9)
        let expected9 = try Self.mapBytes("R/" + (try R.points(dir)[8]["file"] as? String ?? "?"), dir, depths: 1..<5)
        let j = try Self.prune(dir, ["--keep-daily", "2", "--keep-weekly", "2"])
        let merges = j["merges"] as? [[String: Any]] ?? []
        #expect(merges.count == 2 && merges.last?["point"] as? String == ids[9] && merges.last?["direction"] as? String == "up"
                && merges.last?["parent"] as? String == ids[4], "\(j)")
        #expect((merges.last?["bytes-copied"] as? NSNumber)?.uint64Value == expected9, "day 9 gains what days 5-8 hold: \(j)")
        #expect(Self.inode(day9) == inode9, "a middle merge changes the kept file in place")
        let pts = try R.points(dir)
        #expect(pts.map { $0["id"] as? String } == [ids[4], ids[9], ids[10]])
        #expect(pts.map { $0["kind"] as? String } == ["full", "incremental", "incremental"])
        #expect(pts.map { $0["parent"] as? String } == [nil, ids[4], ids[9]])
        for (p, day) in zip(pts, [4, 9, 10]) { try R.expectRestores(dir, point: p["id"] as? String ?? "?", as: "day\(day).qcow2", "policy prune") }
        try R.expectRepositoryClean(dir, "after the policy prune")
        try B.qimg(["repo", "prune", "R", "--keep-monthly", "1"], dir)
        let one = try R.points(dir)
        #expect(one.count == 1 && one.first?["id"] as? String == ids[10] && one.first?["kind"] as? String == "full")
        try R.expectRestores(dir, point: ids[10] ?? "?", as: "day10.qcow2", "monthly")
        try R.expectRepositoryClean(dir, "after the monthly prune")
        try B.tool(["qemu-io", "-c", "write -P 99 0 4k", "vm.qcow2"], dir)
        #expect(try R.backup(dir, day: 11)["kind"] as? String == "incremental")
    }

    /// The guest bytes of `file`'s chain whose topmost holder is data at a depth in
    /// `depths` (qemu-img map: depth 0 is the file itself).
    static func mapBytes(_ file: String, _ dir: String, depths: Range<Int>) throws -> UInt64 {
        let r = try B.tool(["qemu-img", "map", "--output=json", file], dir)
        let list = try JSONSerialization.jsonObject(with: r.stdout) as? [[String: Any]] ?? []
        return list.reduce(0) { sum, e in
            guard (e["data"] as? Bool) == true, let d = (e["depth"] as? NSNumber)?.intValue, depths.contains(d) else { return sum }
            return sum + ((e["length"] as? NSNumber)?.uint64Value ?? 0)
        }
    }

    /// Four days (64 KiB clusters), `prune --keep 2`: day 3 is the oldest kept point and its
    /// full expires. When the full is large and days 2-3 small, day 3's and day 2's data are
    /// committed down into the full, whose file becomes day 3's; when day 3 is large and the
    /// full small, what day 3 lacks is copied up into its own file. The reported bytes are
    /// qemu-img map's counts for each way; every kept point restores its day.
    @Test(.requiresQEMU, arguments: ["down", "up"]) func pruneCopiesTheCheaperWay(_ way: String) throws {
        let dir = try R.scratch("way-\(way)")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir)
        let big = way == "down" ? 1 : 3
        for day in 1...4 {
            let w = day == big ? "write -P \(day) 0 2M" : "write -P \(day) \(2048 + day * 256)k 64k"
            try B.tool(["qemu-io", "-c", w, "-c", "write -z \(3072 + day * 128)k 64k", "vm.qcow2"], dir)
            try B.tool(["qemu-img", "convert", "-O", "qcow2", "vm.qcow2", "day\(day).qcow2"], dir)
            try R.backup(dir, day: day)
        }
        let before = try R.points(dir)
        let file = { (i: Int) in "R/" + (before[i]["file"] as? String ?? "?") }
        // Down copies what days 2-3 hold (depths 0-1 of day 3's chain); up what they lack
        // and days 1-2 hold (depths 1-2).
        let down = try Self.mapBytes(file(2), dir, depths: 0..<2), up = try Self.mapBytes(file(2), dir, depths: 1..<3)
        #expect(way == "down" ? down < up : up < down, "the fixture favours \(way): down \(down), up \(up)")
        let fullInode = Self.inode(dir + "/" + file(0)), keptInode = Self.inode(dir + "/" + file(2))
        let j = try Self.prune(dir, ["--keep", "2"])
        let m = (j["merges"] as? [[String: Any]])?.first ?? [:]
        #expect(m["point"] as? String == before[2]["id"] as? String && m["direction"] as? String == way && m["parent"] is NSNull, "\(j)")
        #expect((m["bytes-copied"] as? NSNumber)?.uint64Value == min(down, up) && (m["bytes-other-way"] as? NSNumber)?.uint64Value == max(down, up), "\(j)")
        #expect((j["bytes-copied"] as? NSNumber)?.uint64Value == min(down, up) && j["removed"] as? [String] == before.prefix(2).map { $0["id"] as? String ?? "" })
        #expect(Self.inode(dir + "/" + file(2)) == (way == "down" ? fullInode : keptInode), "\(way): whose file day 3's is now")
        let after = try R.points(dir)
        #expect(after.map { $0["id"] as? String } == before.suffix(2).map { $0["id"] as? String })
        #expect(after.map { $0["kind"] as? String } == ["full", "incremental"])
        for (i, p) in after.enumerated() { try R.expectRestores(dir, point: p["id"] as? String ?? "?", as: "day\(i + 3).qcow2", way) }
        try R.expectRepositoryClean(dir, way)
        try B.tool(["qemu-io", "-c", "write -P 9 1M 64k", "vm.qcow2"], dir)
        let next = try R.backup(dir, day: 5)
        #expect(next["kind"] as? String == "incremental", "\(next)")
        try R.expectRestores(dir, point: next["id"] as? String ?? "?", as: "vm.qcow2", "\(way): next backup")
    }

    /// A middle merge where down is cheaper: a full, a large incremental, a small one an hour
    /// later; `--keep-daily 2` keeps the full and the newest. The newest is committed down
    /// into the middle point's file (an incremental on the full), which is renamed over its
    /// own: it copies the newest point's data, not the middle one's.
    @Test(.requiresQEMU) func middleMergeCommitsDownWhenCheaper() throws {
        let dir = try R.scratch("middle-down")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir)
        let writes = ["write -P 1 0 4M", "write -P 2 1M 2M", "write -P 3 1536k 64k"]
        let times = ["2026-01-01T02:00:00Z", "2026-01-02T02:00:00Z", "2026-01-02T03:00:00Z"]
        for (i, w) in writes.enumerated() {
            try B.tool(["qemu-io", "-c", w, "-c", "write -z \(3072 + i * 64)k 64k", "vm.qcow2"], dir)
            try B.tool(["qemu-img", "convert", "-O", "qcow2", "vm.qcow2", "day\(i + 1).qcow2"], dir)
            try R.backup(dir, day: i + 1, at: times[i])
        }
        let before = try R.points(dir)
        let id = { (i: Int) in before[i]["id"] as? String ?? "?" }
        let file = { (i: Int) in "R/" + (before[i]["file"] as? String ?? "?") }
        let middleInode = Self.inode(dir + "/" + file(1))
        let down = try Self.mapBytes(file(2), dir, depths: 0..<1), up = try Self.mapBytes(file(2), dir, depths: 1..<2)
        #expect(down < up, "the fixture favours down: down \(down), up \(up)")
        let j = try Self.prune(dir, ["--keep-daily", "2"])
        let m = (j["merges"] as? [[String: Any]])?.first ?? [:]
        #expect(m["point"] as? String == id(2) && m["direction"] as? String == "down" && m["parent"] as? String == id(0), "\(j)")
        #expect((m["bytes-copied"] as? NSNumber)?.uint64Value == down && (m["bytes-other-way"] as? NSNumber)?.uint64Value == up, "\(j)")
        #expect(Self.inode(dir + "/" + file(2)) == middleInode, "day 3's file is now the middle point's")
        let after = try R.points(dir)
        #expect(after.map { $0["kind"] as? String } == ["full", "incremental"] && after.last?["parent"] as? String == id(0), "\(after)")
        try R.expectRestores(dir, point: id(0), as: "day1.qcow2", "middle down")
        try R.expectRestores(dir, point: id(2), as: "day3.qcow2", "middle down")
        try R.expectRepositoryClean(dir, "middle down")
        try B.tool(["qemu-io", "-c", "write -P 9 1M 64k", "vm.qcow2"], dir)
        let next = try R.backup(dir, day: 3)
        #expect(next["kind"] as? String == "incremental" && next["parent"] as? String == id(2), "\(next)")
        try R.expectRestores(dir, point: next["id"] as? String ?? "?", as: "vm.qcow2", "middle down: next backup")
    }

    /// A full and five incrementals (4 KiB clusters), day N's disk saved as dayN.qcow2: 24
    /// scattered writes a day.
    static func sixDays(_ dir: String) throws {
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "vm.qcow2", "8M"], dir)
        for day in 1...6 {
            let writes = (0..<24).flatMap { ["-c", "write -P \(day) \($0 * 320 + day * 48 + 8)k 4k"] }
            try B.tool(["qemu-io"] + writes + ["-c", "write -z \((day + 2) * 200)k 8k", "vm.qcow2"], dir)
            try B.tool(["qemu-img", "convert", "-O", "qcow2", "vm.qcow2", "day\(day).qcow2"], dir)
            try R.backup(dir, day: day)
        }
    }

    /// `days` daily points (4 KiB clusters) from 2026-01-01: 8 scattered 4 KiB writes a
    /// day, and on day `big` 1 MiB more (the full: a downward merge is cheaper; a later
    /// day: an upward one).
    static func killFixture(_ dir: String, days: Int, big: Int) throws {
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "vm.qcow2", "8M"], dir)
        for day in 1...days {
            var writes = (0..<8).flatMap { ["-c", "write -P \(day) \($0 * 320 + day * 24 + 8)k 4k"] }
            if day == big { writes += ["-c", "write -P \(day + 40) 6M 1M"] }
            try B.tool(["qemu-io"] + writes + ["-c", "write -z \((day + 2) * 200)k 8k", "vm.qcow2"], dir)
            try B.tool(["qemu-img", "convert", "-O", "qcow2", "vm.qcow2", "day\(day).qcow2"], dir)
            try R.backup(dir, day: day)
        }
    }

    /// SIGKILL at every write and every sync (odd writes torn) of two prunes: `--keep 3` on
    /// a chain whose full is large (day 4 committed down into the full), and --keep-daily 2
    /// --keep-weekly 2 on a chain whose day 4 is large (day 4 merged up into a full, day 6
    /// merged up onto day 4: a middle merge). Right after each kill every listed point
    /// reads (qemu-img compare, through its backing files) as its day's disk; the next
    /// prune finishes, leaves only the kept files, every file checks clean, verify passes
    /// and each kept point reads as its day; the next backup is an incremental reading as
    /// the disk. (qemu-img reads the files directly here, to keep the campaign short;
    /// restores are tested above.)
    @Test(.requiresQEMU) func killPruneAtEveryWriteAndSync() throws {
        let keep = try Self.killCampaign("down", days: 6, big: 1, ["--keep", "3"], kept: [4, 5, 6])
        let policy = try Self.killCampaign("up", days: 7, big: 4, ["--keep-daily", "2", "--keep-weekly", "2"], kept: [4, 6, 7])
        print("killPruneAtEveryWriteAndSync: \(keep) kills (--keep), \(policy) kills (policy)")
        #expect(keep >= 50 && policy >= 50 && keep + policy >= 100, "kill points: --keep \(keep), policy \(policy)")
    }

    /// The same campaign over a middle merge that goes down: the same policy on a chain
    /// whose day 5 is large, so that day 6's data is committed into day 5's file, which is
    /// then renamed over day 6's (while days 1-3 merge into day 4).
    @Test(.requiresQEMU) func killPruneDuringAMiddleMergeDown() throws {
        let kills = try Self.killCampaign("down", days: 7, big: 5, ["--keep-daily", "2", "--keep-weekly", "2"], kept: [4, 6, 7], checked: 1)
        print("killPruneDuringAMiddleMergeDown: \(kills) kills")
        #expect(kills >= 50, "kill points: \(kills)")
    }

    /// The three campaigns above (down into the full, up into the full and a middle point,
    /// down in the middle), each kill followed by the loss of the manifest: at odd kills the
    /// manifest alone, at even ones the manifest and the id file (see `loseTheManifest`).
    @Test(.requiresQEMU, arguments: ["down", "up", "middle-down"]) func killPruneThenLoseTheManifest(_ campaign: String) throws {
        let kills = switch campaign {
        case "down": try Self.killCampaign("down", days: 6, big: 1, ["--keep", "3"], kept: [4, 5, 6], losing: true)
        case "up": try Self.killCampaign("up", days: 7, big: 4, ["--keep-daily", "2", "--keep-weekly", "2"], kept: [4, 6, 7], losing: true)
        default: try Self.killCampaign("down", days: 7, big: 5, ["--keep-daily", "2", "--keep-weekly", "2"], kept: [4, 6, 7], checked: 1, losing: true)
        }
        print("killPruneThenLoseTheManifest(\(campaign)): \(kills) kills")
        #expect(kills >= 50, "kill points: \(kills)")
    }

    /// Right after a killed prune, the manifest is lost (with `idFile`, the id file too):
    /// the rebuilt list is the manifest's, or the kept points (a prune that had not changed
    /// a file yet may go on), never a point the manifest had dropped nor one missing from it.
    /// Returns the reason the next backup must give for a full, nil when it must be an
    /// incremental: the link to the image's bitmap is lost only with the id file when no
    /// prune journal kept the id.
    static func loseTheManifest(_ dir: String, _ spec: String, idFile: Bool, all: [String], kept: [String]) throws -> String? {
        let recorded = try Self.ids(dir)
        let journal = B.exists(dir, "R/.qimg-prune.json")
        unlink(dir + "/R/qimg-repository.json")
        if idFile { unlink(dir + "/R/qimg-repository.id") }
        let rebuilt = try Self.ids(dir)
        #expect([recorded, kept].contains(rebuilt) && [all, kept].contains(recorded),
                "\(spec): the manifest listed \(recorded), the rebuilt one \(rebuilt) (all \(all), kept \(kept))")
        return idFile && !journal ? "bitmap missing" : nil
    }

    /// A prune journal that cannot be read, with the manifest lost: list, prune and backup
    /// stop with exit 2 (repository damaged) and one line naming the journal, and nothing
    /// changes on disk (a rebuild without the journal could list the points it expired).
    @Test(.requiresQEMU) func unreadableJournalIsDamage() throws {
        let dir = try R.scratch("journal-damaged")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir)
        for day in 1...2 {
            try B.tool(["qemu-io", "-c", "write -P \(day) \(day * 256)k 64k", "vm.qcow2"], dir)
            try R.backup(dir, day: day)
        }
        unlink(dir + "/R/qimg-repository.json")
        try Data("{\"format\": \"qimg-prune-journal\", \"version\": 1,".utf8).write(to: URL(fileURLWithPath: dir + "/R/.qimg-prune.json"))
        let before = try FileManager.default.subpathsOfDirectory(atPath: dir + "/R").sorted()
        let image = try B.bytes(dir, "vm.qcow2")
        for args in [["repo", "list", "R"], ["repo", "prune", "R", "--keep", "1"], ["backup", "--repo", "R", "--bitmap=daily", "vm.qcow2"]] {
            let r = try Qimg.run(args, cwd: dir)
            #expect(r.status == 2 && r.stderrLines.count == 1 && r.err.contains(".qimg-prune.json"), "\(args): \(r.summary): \(r.err)")
        }
        #expect(try FileManager.default.subpathsOfDirectory(atPath: dir + "/R").sorted() == before)
        #expect(try B.bytes(dir, "vm.qcow2") == image)
    }

    /// A prune journal of another repository (copied in from elsewhere) decides nothing here:
    /// with the manifest, and with the manifest lost but the id file kept, every command
    /// exits 2 naming it, before any file changes.
    @Test(.requiresQEMU, arguments: [false, true]) func journalOfAnotherRepositoryIsDamage(manifestLost: Bool) throws {
        let dir = try R.scratch("journal-foreign-\(manifestLost)")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir)
        for day in 1...2 {
            try B.tool(["qemu-io", "-c", "write -P \(day) \(day * 256)k 64k", "vm.qcow2"], dir)
            try R.backup(dir, day: day)
        }
        let ownID = try String(contentsOfFile: dir + "/R/qimg-repository.id", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        let foreignID = ownID == "0badc0de" ? "0badc0df" : "0badc0de"
        let first = try #require(try R.points(dir).first?["file"] as? String)
        let journal = "{\"format\": \"qimg-prune-journal\", \"version\": 1, \"repository-id\": \"\(foreignID)\", " +
            "\"image\": \"vm.qcow2\", \"expired\": [\"\(first)\"], \"merges\": []}\n"
        try Data(journal.utf8).write(to: URL(fileURLWithPath: dir + "/R/.qimg-prune.json"))
        if manifestLost { unlink(dir + "/R/qimg-repository.json") }
        let before = try FileManager.default.subpathsOfDirectory(atPath: dir + "/R").sorted()
        let image = try B.bytes(dir, "vm.qcow2")
        for args in [["repo", "list", "R"], ["repo", "prune", "R", "--keep", "1"], ["backup", "--repo", "R", "--bitmap=daily", "vm.qcow2"]] {
            let r = try Qimg.run(args, cwd: dir)
            #expect(r.status == 2 && r.stderrLines.count == 1 && r.err.contains(".qimg-prune.json") && r.err.contains(foreignID),
                    "\(args): \(r.summary): \(r.err)")
        }
        #expect(try FileManager.default.subpathsOfDirectory(atPath: dir + "/R").sorted() == before)
        #expect(FileManager.default.fileExists(atPath: dir + "/R/" + first))
        #expect(try B.bytes(dir, "vm.qcow2") == image)
    }

    /// One campaign; returns the number of kills. The merge into kept point `checked` (an
    /// index into `kept`) must go `way`. `losing`: each kill is followed by the loss of the
    /// manifest (`loseTheManifest`; the id file too at every second kill).
    static func killCampaign(_ way: String, days: Int, big: Int, _ args: [String], kept: [Int], checked: Int = 0,
                             losing: Bool = false) throws -> Int {
        let dir = try R.scratch("prune-kill-\(way)-\(checked)\(losing ? "-lost" : "")")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.killFixture(dir, days: days, big: big)
        let ids = try Self.ids(dir)
        let days = Dictionary(uniqueKeysWithValues: ids.enumerated().map { ($0.element, $0.offset + 1) })
        try R.shell("cp -a R R.template && cp -a vm.qcow2 vm.template", dir)
        var kills = 0
        for kind in ["write", "sync"] {
            for n in 1..<600 {
                try? FileManager.default.removeItem(atPath: dir + "/R")
                try R.shell("cp -a R.template R && cp -a vm.template vm.qcow2", dir)
                let spec = "\(kind):\(n):kill\(kind == "write" && n % 2 == 1 ? ":partial" : "")"
                let r = try Runner.run("/usr/bin/env", ["QIMG_FAULTS=\(spec)", Qimg.path, "repo", "prune", "R", "--output=json"] + args, cwd: dir)
                if r.exitedNormally && r.status == 0 {
                    let j = try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any] ?? [:]
                    let m = j["merges"] as? [[String: Any]] ?? []
                    let merge = m.first { $0["point"] as? String == ids[kept[checked] - 1] }
                    #expect(merge?["direction"] as? String == way, "\(spec): \(j)")
                    break
                }
                #expect(r.signaled && r.status == SIGKILL, "\(spec): \(r.summary): \(r.err)")
                kills += 1
                let fullReason = losing ? try Self.loseTheManifest(dir, spec, idFile: kills % 2 == 0, all: ids, kept: kept.map { ids[$0 - 1] }) : nil
                for p in try R.points(dir) {
                    let id = p["id"] as? String ?? "?"
                    try B.expectIdentical("R/" + (p["file"] as? String ?? "?"), "day\(days[id] ?? 0).qcow2", dir, "\(spec): right after the kill")
                }
                try B.qimg(["repo", "prune", "R"] + args, dir)
                #expect(try Self.ids(dir) == kept.map { ids[$0 - 1] }, "\(spec)")
                try R.expectRepositoryClean(dir, "\(spec): after the next prune")
                for (p, day) in zip(try R.points(dir), kept) {
                    try B.expectIdentical("R/" + (p["file"] as? String ?? "?"), "day\(day).qcow2", dir, "\(spec): after the next prune")
                }
                #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/R/vm.qcow2").count == kept.count, "\(spec): files left")
                try B.tool(["qemu-io", "-c", "write -P 9 1M 4k", "vm.qcow2"], dir)
                let next = try R.backup(dir, day: 9)
                #expect(next["kind"] as? String == (fullReason == nil ? "incremental" : "full") && next["full-reason"] as? String == fullReason,
                        "\(spec): \(next)")
                try B.expectIdentical("R/" + (next["file"] as? String ?? "?"), "vm.qcow2", dir, "\(spec): next backup")
            }
        }
        return kills
    }

    /// Thirty simulated days (2026-01-20 to 02-18, 02:00 UTC; 64 KiB clusters; a full
    /// every 7 points), a few qemu-io writes a day and each day's disk saved: every point
    /// restores its day's disk. Then each policy prunes a copy of the repository: the kept
    /// points are those the policy names (worked out here with Foundation's ISO-8601
    /// calendar), each still restores its day's disk, the oldest is a full, every file is
    /// clean and verify passes; a second prune and the next backup work on the result.
    @Test(.requiresQEMU) func thirtyDaysEveryPolicy() throws {
        let dir = try R.scratch("thirty")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir)
        var cal = Calendar(identifier: .iso8601)
        cal.timeZone = TimeZone(identifier: "UTC")!
        let start = cal.date(from: DateComponents(year: 2026, month: 1, day: 20, hour: 2))!
        let dates = (0..<30).map { cal.date(byAdding: .day, value: $0, to: start)! }
        let iso = ISO8601DateFormatter()
        var rng = SeededRNG(state: 30)
        var ids: [String] = []
        for (d, date) in dates.enumerated() {
            let cmds: [String] = (0..<3).flatMap { _ -> [String] in
                let off = rng.next() % (4 << 20 - 100_000), len = 512 + rng.next() % 90_000
                return ["-c", rng.next() % 4 == 0 ? "write -z \(off) \(len)" : "write -P \(d + 1) \(off) \(len)"]
            }
            try B.tool(["qemu-io"] + cmds + ["vm.qcow2"], dir)
            try B.tool(["qemu-img", "convert", "-O", "qcow2", "vm.qcow2", "day\(d).qcow2"], dir)
            let p = try R.backup(dir, day: d, ["--full-every", "7"], at: iso.string(from: date))
            #expect(p["kind"] as? String == (d % 7 == 0 ? "full" : "incremental"), "day \(d): \(p)")
            ids.append(p["id"] as? String ?? "?")
        }
        for (d, id) in ids.enumerated() { try R.expectRestores(dir, point: id, as: "day\(d).qcow2", "before any prune") }
        try R.expectRepositoryClean(dir, "thirty days")

        // The days a policy keeps (restic's rules): the newest `last`, the newest point of
        // each of the newest N days / ISO weeks / months, and the newest point.
        func kept(last: Int = 0, daily: Int = 0, weekly: Int = 0, monthly: Int = 0) -> [Int] {
            var keep = Set(max(0, 30 - last)..<30).union([29])
            func by(_ n: Int, _ key: (Date) -> [Int]) {
                var seen: [[Int]] = []
                for d in (0..<30).reversed() where !seen.contains(key(dates[d])) && seen.count < n {
                    seen.append(key(dates[d]))
                    keep.insert(d)
                }
            }
            by(daily) { let c = cal.dateComponents([.year, .month, .day], from: $0); return [c.year!, c.month!, c.day!] }
            by(weekly) { let c = cal.dateComponents([.yearForWeekOfYear, .weekOfYear], from: $0); return [c.yearForWeekOfYear!, c.weekOfYear!] }
            by(monthly) { let c = cal.dateComponents([.year, .month], from: $0); return [c.year!, c.month!] }
            return keep.sorted()
        }
        let policies: [(String, [String], [Int])] = [
            ("keep", ["--keep", "5"], kept(last: 5)),
            ("daily", ["--keep-daily", "10"], kept(daily: 10)),
            ("weekly", ["--keep-weekly", "3"], kept(weekly: 3)),
            ("monthly", ["--keep-monthly", "2"], kept(monthly: 2)),
            ("combined", ["--keep", "2", "--keep-daily", "4", "--keep-weekly", "3", "--keep-monthly", "2"],
             kept(last: 2, daily: 4, weekly: 3, monthly: 2)),
        ]
        for (label, args, days) in policies {
            try R.shell("cp -a R P-\(label)", dir)
            try Self.prune(dir, repo: "P-\(label)", args)
            try Self.expectKept(dir, repo: "P-\(label)", days: days, ids: ids, label)
        }
        // The combined result pruned again, then the next backup on it.
        try Self.prune(dir, repo: "P-combined", ["--keep-weekly", "1"])
        try Self.expectKept(dir, repo: "P-combined", days: [29], ids: ids, "combined, then --keep-weekly 1")
        try B.tool(["qemu-io", "-c", "write -P 77 1M 64k", "vm.qcow2"], dir)
        let next = try R.backup(dir, day: 30, repo: "P-combined", at: iso.string(from: cal.date(byAdding: .day, value: 30, to: start)!))
        #expect(next["kind"] as? String == "incremental", "\(next)")
        try R.expectRestores(dir, repo: "P-combined", point: next["id"] as? String ?? "?", as: "vm.qcow2", "after the prunes")
    }

    /// `repo` lists exactly the points of `days` (their ids unchanged), oldest a full, each
    /// parent the previous kept point (or none: a full), each restoring its day's disk.
    static func expectKept(_ dir: String, repo: String, days: [Int], ids: [String], _ label: String) throws {
        let pts = try R.points(dir, repo: repo)
        #expect(pts.map { $0["id"] as? String ?? "?" } == days.map { ids[$0] }, "\(label): kept days \(days)")
        #expect(pts.first?["kind"] as? String == "full", "\(label)")
        for (i, p) in pts.enumerated() {
            let parent = p["parent"] as? String
            #expect(parent == nil ? p["kind"] as? String == "full" : i > 0 && parent == pts[i - 1]["id"] as? String, "\(label): \(p)")
        }
        for (id, d) in zip(pts.map { $0["id"] as? String ?? "?" }, days) {
            try R.expectRestores(dir, repo: repo, point: id, as: "day\(d).qcow2", label)
        }
        try R.expectRepositoryClean(dir, repo: repo, label)
    }
}
