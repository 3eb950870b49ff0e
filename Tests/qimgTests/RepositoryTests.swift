// Backup repositories (issue 14): `qimg backup --repo` chooses full or incremental by
// itself and can never build a wrong chain; `qimg repo list/verify/restore`. QEMU's tools
// are the oracles: qemu-io writes the guest data, qemu-img convert saves each day's disk,
// qemu-img compare and check judge every restore point.

import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

@Suite struct RepositoryTests {
    typealias B = BackupTests

    static func scratch(_ name: String) throws -> String { try Paths.newScratch("repo-\(name)") }

    /// `qimg backup --repo R --bitmap=daily [extra] vm.qcow2 --output=json`, which must
    /// succeed: the point it printed.
    @discardableResult
    static func backup(_ dir: String, day: Int, repo: String = "R", image: String = "vm.qcow2", _ extra: [String] = [], at: String? = nil) throws -> [String: Any] {
        let time = at ?? String(format: "2026-01-%02dT02:00:00Z", day)
        let r = try B.qimg(["backup", "--repo", repo, "--bitmap=daily", "--time", time, "--output=json"] + extra + [image], dir)
        let obj = try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any] ?? [:]
        #expect(r.stderrLines.count == 1, "one summary line: \(r.err)")
        return obj
    }

    static func shell(_ command: String, _ dir: String) throws {
        let r = try Runner.run("/bin/sh", ["-c", command], cwd: dir)
        guard r.exitedNormally, r.status == 0 else { throw TestFailure("\(command): \(r.summary): \(r.err)") }
    }

    static func list(_ dir: String, repo: String = "R") throws -> [[String: Any]] {
        let r = try B.qimg(["repo", "list", "--output=json", repo], dir)
        let obj = try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any] ?? [:]
        return obj["images"] as? [[String: Any]] ?? []
    }

    static func points(_ dir: String, repo: String = "R") throws -> [[String: Any]] {
        try list(dir, repo: repo).first?["points"] as? [[String: Any]] ?? []
    }

    /// Restores point `id` and expects it to read as `expected` (qemu-img compare).
    static func expectRestores(_ dir: String, repo: String = "R", point id: String, as expected: String, _ label: String,
                               sourceLocation: SourceLocation = #_sourceLocation) throws {
        let out = "restored-\(repo)-\(id).qcow2"
        unlink(dir + "/" + out)
        try B.qimg(["repo", "restore", repo, "--point", id, out], dir)
        try B.expectIdentical(expected, out, dir, "\(label): point \(id)", sourceLocation: sourceLocation)
        #expect(try B.backingFile(out, dir) == nil, "\(label): a restored image stands alone")
        unlink(dir + "/" + out)
    }

    /// Every point file of the repository passes qemu-img check, names its backing file
    /// relatively (the bare file name), and `repo verify` passes.
    static func expectRepositoryClean(_ dir: String, repo: String = "R", _ label: String, except damaged: Set<String> = []) throws {
        for p in try points(dir, repo: repo) where !damaged.contains(p["id"] as? String ?? "") {
            let file = repo + "/" + (p["file"] as? String ?? "?")
            try expectCheckClean(file, dir, label)
            if let b = try B.backingFile(file, dir) { #expect(!b.contains("/"), "\(label): \(file) names its backing file '\(b)'") }
        }
        let v = try Qimg.run(["repo", "verify", repo], cwd: dir)
        #expect(v.status == (damaged.isEmpty ? 0 : 2), "\(label): verify: \(v.err)")
        for id in damaged { #expect(v.err.contains("point \(id)"), "\(label): verify names \(id): \(v.err)") }
    }

    /// A simulated run of nine days: qemu-io writes between runs, each day's disk saved with
    /// qemu-img convert; a full every 4 points. Every point restores byte-identical to its
    /// day's copy, every file is clean, kinds and parents are as the policy says.
    @Test(.requiresQEMU) func simulatedDaysRestoreEveryPoint() throws {
        let dir = try Self.scratch("days")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "8M"], dir)
        var rng = SeededRNG(state: 14)
        var ids: [String] = []
        for day in 1...9 {
            var cmds: [String] = []
            for _ in 0..<4 {
                let off = rng.next() % (8 << 20 - 200_000), len = 512 + rng.next() % 150_000
                cmds += ["-c", rng.next() % 4 == 0 ? "write -z \(off) \(len)" : "write -P \(day) \(off) \(len)"]
            }
            try B.tool(["qemu-io"] + cmds + ["vm.qcow2"], dir)
            try B.tool(["qemu-img", "convert", "-O", "qcow2", "vm.qcow2", "day\(day).qcow2"], dir)
            let p = try Self.backup(dir, day: day, ["--full-every", "4"])
            let full = (day - 1) % 4 == 0
            #expect(p["kind"] as? String == (full ? "full" : "incremental"), "day \(day): \(p)")
            #expect(p["full-reason"] as? String == (day == 1 ? "no chain" : full ? "policy: --full-every" : nil), "day \(day): \(p)")
            #expect((p["parent"] as? String) == (full ? nil : ids.last), "day \(day): \(p)")
            ids.append(p["id"] as? String ?? "?")
        }
        #expect(Set(ids).count == 9)
        #expect(ids == ids.sorted(), "point ids sort in creation order: \(ids)")
        for (i, id) in ids.enumerated() { try Self.expectRestores(dir, point: id, as: "day\(i + 1).qcow2", "day \(i + 1)") }
        try Self.expectRepositoryClean(dir, "after nine days")
        // The newest point by default, by time, and as raw.
        try B.qimg(["repo", "restore", "R", "-O", "raw", "newest.raw"], dir)
        try B.expectIdentical("day9.qcow2", "newest.raw", dir, "newest point, raw")
        try B.qimg(["repo", "restore", "R", "--at", "2026-01-05T12:00:00Z", "at5.qcow2"], dir)
        try B.expectIdentical("day5.qcow2", "at5.qcow2", dir, "--at day 5 noon")
        // The repository can be moved whole.
        try FileManager.default.moveItem(atPath: dir + "/R", toPath: dir + "/moved")
        try Self.expectRestores(dir, repo: "moved", point: ids[6], as: "day7.qcow2", "moved repository")
    }

    /// `repo list --output=json` is exactly the issue's shape, oldest point first; values
    /// checked against qemu-img info of each file.
    @Test(.requiresQEMU) func listJSONShape() throws {
        let dir = try Self.scratch("list")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir)
        try B.tool(["qemu-io", "-c", "write -P 1 0 1M", "vm.qcow2"], dir)
        try Self.backup(dir, day: 2)
        try B.tool(["qemu-io", "-c", "write -P 2 1M 64k", "vm.qcow2"], dir)
        try Self.backup(dir, day: 3)
        let images = try Self.list(dir)
        #expect(images.count == 1)
        #expect(images.first?["image"] as? String == "vm.qcow2")
        let pts = images.first?["points"] as? [[String: Any]] ?? []
        #expect(pts.count == 2)
        for (i, p) in pts.enumerated() {
            #expect(p["id"] is String && p["file"] is String && p["bytes-copied"] is NSNumber)
            #expect(p["kind"] as? String == (i == 0 ? "full" : "incremental"))
            #expect(i == 0 ? p["parent"] is NSNull : p["parent"] as? String == pts[0]["id"] as? String)
            #expect(p["time"] as? String == "2026-01-0\(i + 2)T02:00:00Z")
            let info = try B.tool(["qemu-img", "info", "--output=json", "R/" + (p["file"] as? String ?? "")], dir)
            let obj = try JSONSerialization.jsonObject(with: info.stdout) as? [String: Any] ?? [:]
            #expect((p["virtual-size"] as? NSNumber)?.uint64Value == (obj["virtual-size"] as? NSNumber)?.uint64Value)
        }
        #expect((pts[1]["bytes-copied"] as? NSNumber)?.uint64Value == 65536)
        let human = try B.qimg(["repo", "list", "R"], dir).out
        for p in pts { #expect(human.contains(p["id"] as? String ?? "?")) }
    }

    /// The recorded SHA-256 of a data run is the one sha256sum computes over the same guest bytes.
    @Test(.requiresQEMU) func digestsMatchSha256sum() throws {
        let dir = try Self.scratch("sha")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "8M"], dir)
        try B.tool(["qemu-io", "-c", "write -P 0x5a 1M 192k", "vm.qcow2"], dir)
        try Self.backup(dir, day: 1)
        let text = try String(contentsOfFile: dir + "/R/qimg-repository.json", encoding: .utf8)
        try B.tool(["qemu-img", "convert", "-O", "raw", "vm.qcow2", "vm.raw"], dir)
        let r = try Runner.run("/bin/sh", ["-c", "dd if=vm.raw bs=64k skip=16 count=3 status=none | sha256sum"], cwd: dir)
        let sum = String(r.out.prefix(64))
        #expect(sum.count == 64 && text.contains("[1048576, 196608, \"\(sum)\"]"), "\(sum) in \(text)")
    }

    /// Each failure of the issue's first list now takes a full backup with its reason (exit
    /// 0), and every point still restores right.
    @Test(.requiresQEMU) func unsafeIncrementalsBecomeFulls() throws {
        let dir = try Self.scratch("reasons")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir)
        var day = 0
        func step(_ expectedReason: String?, _ label: String, before: () throws -> Void = {}) throws {
            day += 1
            try B.tool(["qemu-io", "-c", "write -P \(day) \(day * 128)k 64k", "vm.qcow2"], dir)
            try before()
            let p = try Self.backup(dir, day: day)
            #expect(p["full-reason"] as? String == expectedReason, "\(label): \(p)")
            #expect(p["kind"] as? String == (expectedReason == nil ? "incremental" : "full"), "\(label)")
            try Self.expectRestores(dir, point: p["id"] as? String ?? "?", as: "vm.qcow2", label)
        }
        func newestFile() throws -> String { "R/" + (try Self.points(dir).last?["file"] as? String ?? "?") }
        var damaged: Set<String> = []
        func damage() throws { damaged.insert(try Self.points(dir).last?["id"] as? String ?? "?") }
        try step("no chain", "first run")
        try step(nil, "second run")
        try step("newest point missing or replaced", "newest point deleted") { try damage(); unlink(dir + "/" + (try newestFile())) }
        try step(nil, "after the full")
        try step("newest point missing or replaced", "newest point replaced") {
            let f = try newestFile()
            try damage()
            try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "other.qcow2", "4M"], dir)
            try B.tool(["qemu-io", "-c", "write -P 9 0 256k", "other.qcow2"], dir)
            unlink(dir + "/" + f)
            try FileManager.default.moveItem(atPath: dir + "/other.qcow2", toPath: dir + "/" + f)
        }
        try step("bitmap missing", "bitmap removed") {
            let name = try Self.points(dir).last?["bitmap"] as? String ?? "?"
            try B.tool(["qemu-img", "bitmap", "--remove", "vm.qcow2", name], dir)
        }
        try step(nil, "after the full")
        try step("bitmap disabled", "bitmap disabled (it records nothing)") {
            let name = try Self.points(dir).last?["bitmap"] as? String ?? "?"
            try B.tool(["qemu-img", "bitmap", "--disable", "vm.qcow2", name], dir)
        }
        try step("bitmap in use", "bitmap in use (a writer aborted)") {
            _ = try Runner.run("/usr/bin/env", ["qemu-io", "-c", "write -P 0x77 3M 4k", "-c", "abort", "vm.qcow2"], cwd: dir)
        }
        try step("size changed", "image grown") { try B.tool(["qemu-img", "resize", "-q", "vm.qcow2", "5M"], dir) }
        try step(nil, "back to incrementals")
        // Every other point still is as recorded (verify), files are clean; verify names
        // the two damaged points, and the newest point's chain verifies.
        try Self.expectRepositoryClean(dir, "after the failures", except: damaged)
        let newest = try Self.points(dir).last?["id"] as? String ?? "?"
        #expect(try Qimg.run(["repo", "verify", "R", "--point", newest], cwd: dir).status == 0)
    }

    /// Two repositories with the same bitmap NAME on one image: each keeps its own bitmap
    /// and its own chain; every point of both restores right.
    @Test(.requiresQEMU) func twoRepositoriesWithTheSameName() throws {
        let dir = try Self.scratch("two")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir)
        for day in 1...4 {
            try B.tool(["qemu-io", "-c", "write -P \(day) \(day * 256)k 100k", "vm.qcow2"], dir)
            for repo in day % 2 == 0 ? ["A", "B"] : ["A"] {
                let p = try Self.backup(dir, day: day, repo: repo)
                #expect((p["kind"] as? String == "full") == ((repo == "A" && day == 1) || (repo == "B" && day == 2)), "day \(day) \(repo): \(p)")
                try Self.expectRestores(dir, repo: repo, point: p["id"] as? String ?? "?", as: "vm.qcow2", "day \(day) \(repo)")
            }
        }
        try Self.expectRepositoryClean(dir, repo: "A", "repository A")
        try Self.expectRepositoryClean(dir, repo: "B", "repository B")
    }

    /// verify finds a flipped byte in a data cluster (point id and guest offset), a
    /// truncated file and a deleted file, each with exit 2.
    @Test(.requiresQEMU) func verifyFindsDamage() throws {
        let dir = try Self.scratch("verify")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "16M"], dir)
        try B.tool(["qemu-io", "-c", "write -P 1 0 6M", "vm.qcow2"], dir)
        try Self.backup(dir, day: 1)
        try B.tool(["qemu-io", "-c", "write -P 2 9M 64k", "vm.qcow2"], dir)
        try Self.backup(dir, day: 2)
        let pts = try Self.points(dir)
        try Self.shell("cp -a R pristine", dir)
        func reset() throws {
            try FileManager.default.removeItem(atPath: dir + "/R")
            try Self.shell("cp -a pristine R", dir)
        }
        func expectFailure(_ label: String, _ needles: [String]) throws {
            let r = try Qimg.run(["repo", "verify", "R"], cwd: dir)
            #expect(r.status == 2, "\(label): \(r.summary)")
            for n in needles { #expect(r.err.contains(n), "\(label): '\(n)' in \(r.err)") }
        }
        for (i, p) in pts.enumerated() {
            let file = "R/" + (p["file"] as? String ?? "")
            let id = p["id"] as? String ?? "?"
            // The host offset of guest data (qemu-img map), flipped.
            let map = try B.tool(["qemu-img", "map", "--output=json", file], dir)
            let entries = try JSONSerialization.jsonObject(with: map.stdout) as? [[String: Any]] ?? []
            let flip: UInt64 = i == 0 ? (5 << 20) + 4097 : (9 << 20) + 4097
            guard let e = entries.first(where: {
                      let st = ($0["start"] as? NSNumber)?.uint64Value ?? 0, n = ($0["length"] as? NSNumber)?.uint64Value ?? 0
                      return ($0["depth"] as? NSNumber)?.intValue == 0 && ($0["data"] as? Bool) == true && st <= flip && flip < st + n }),
                  let host = (e["offset"] as? NSNumber)?.uint64Value, let guest = (e["start"] as? NSNumber)?.uint64Value else {
                Issue.record("no data in \(file)"); continue
            }
            // The run holding it: runs are cut at every 4 MiB of the guest.
            let runStart = i == 0 ? UInt64(4 << 20) : UInt64(9 << 20)
            let fd = open(dir + "/" + file, O_RDWR)
            var b: UInt8 = 0
            _ = pread(fd, &b, 1, off_t(host + flip - guest))
            b ^= 0x40
            _ = pwrite(fd, &b, 1, off_t(host + flip - guest))
            close(fd)
            try expectFailure("flipped byte in point \(id)", ["point \(id) at guest offset \(runStart)"])
            try reset()
            try Self.shell("truncate -s -65536 \(file)", dir)
            try expectFailure("truncated point \(id)", ["point \(id)", "truncated"])
            try reset()
            unlink(dir + "/" + file)
            try expectFailure("deleted point \(id)", ["point \(id)", "missing"])
            // Restoring the newest point through the gap: damage too (exit 2), named by the
            // point whose file is gone, and nothing written.
            let restore = try Qimg.run(["repo", "restore", "R", "-O", "raw", "out.raw"], cwd: dir)
            #expect(restore.status == 2, "restore without point \(id)'s file: \(restore.summary)")
            #expect(restore.err.contains("point \(id)") && restore.err.contains("missing"), "\(restore.err)")
            #expect(!FileManager.default.fileExists(atPath: dir + "/out.raw"))
            try reset()
        }
        let ok = try Qimg.run(["repo", "verify", "R", "--point", pts[0]["id"] as? String ?? "?"], cwd: dir)
        #expect(ok.status == 0, "\(ok.err)")
    }

    /// Permissions: the repository directory 0700, point files, manifest and restored
    /// images with the image's bits (0600 here); plain backup targets too; a repository
    /// directory other users can write is refused and left as it was.
    @Test(.requiresQEMU) func permissionsFollowTheImage() throws {
        let dir = try Self.scratch("perm")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir)
        chmod(dir + "/vm.qcow2", 0o600)
        try Self.backup(dir, day: 1)
        func mode(_ f: String) -> mode_t { var st = stat(); _ = stat(dir + "/" + f, &st); return st.st_mode & 0o777 }
        #expect(mode("R") == 0o700)
        #expect(mode("R/qimg-repository.json") == 0o600)
        #expect(mode("R/" + (try Self.points(dir).first?["file"] as? String ?? "")) == 0o600)
        try B.qimg(["repo", "restore", "R", "out.qcow2"], dir)
        #expect(mode("out.qcow2") == 0o600)
        try B.qimg(["backup", "--sync=full", "vm.qcow2", "plain.qcow2"], dir)
        #expect(mode("plain.qcow2") == 0o600)
        try B.qimg(["convert", "-O", "qcow2", "vm.qcow2", "converted.qcow2"], dir)
        #expect(mode("converted.qcow2") == 0o600)
        chmod(dir + "/vm.qcow2", 0o640)
        try B.qimg(["convert", "-O", "raw", "vm.qcow2", "converted.raw"], dir)
        #expect(mode("converted.raw") == 0o640)
        try FileManager.default.createDirectory(atPath: dir + "/open", withIntermediateDirectories: false)
        chmod(dir + "/open", 0o777)
        let r = try Qimg.run(["backup", "--repo", "open", "--bitmap=daily", "vm.qcow2"], cwd: dir)
        #expect(r.status == 1 && r.err.contains("writable by other users"), "\(r.summary): \(r.err)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/open").isEmpty)
    }

    /// A run that finds the repository locked exits 3 at once and changes nothing; a
    /// damaged manifest exits 2.
    @Test(.requiresQEMU) func lockHeldAndDamagedManifest() throws {
        let dir = try Self.scratch("lock")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir)
        try Self.backup(dir, day: 1)
        // One point: singular nouns.
        let v = try B.qimg(["repo", "verify", "R"], dir)
        #expect(v.out.hasPrefix("R: 1 point verified, "), "\(v.out)")
        #expect(try B.qimg(["repo", "list", "R"], dir).out.contains("\nvm.qcow2: 1 point\n"))
        let before = try B.bytes(dir, "R/qimg-repository.json")
        let fd = open(dir + "/R/.lock", O_RDWR)
        #expect(flock(fd, LOCK_EX) == 0)
        let r = try Qimg.run(["backup", "--repo", "R", "--bitmap=daily", "--lock-wait", "0", "vm.qcow2"], cwd: dir)
        close(fd)
        #expect(r.status == 3 && r.err.contains("locked"), "\(r.summary): \(r.err)")
        #expect(try B.bytes(dir, "R/qimg-repository.json") == before)
        #expect(try Self.points(dir).count == 1)
        try before.prefix(before.count / 2).write(to: URL(fileURLWithPath: dir + "/R/qimg-repository.json"))
        for args in [["repo", "list", "R"], ["repo", "verify", "R"], ["backup", "--repo", "R", "--bitmap=daily", "vm.qcow2"]] {
            let d = try Qimg.run(args, cwd: dir)
            #expect(d.status == 2 && d.stderrLines.count == 1 && d.err.contains("repository damaged"), "\(args): \(d.summary): \(d.err)")
        }
    }

    /// The job's bitmaps in `image`, as qemu-img info lists them (`daily@...`).
    static func jobBitmaps(_ dir: String, image: String = "vm.qcow2") throws -> [String] {
        try BitmapScaleTests.listedBitmaps(image, dir).map(\.name).filter { $0.hasPrefix("daily@") }
    }

    /// Whether process `pid` has a descriptor open on a path ending in `suffix`.
    static func hasOpen(_ pid: pid_t, _ suffix: String) -> Bool {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
        return fds.contains { ((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\($0)")) ?? "").hasSuffix(suffix) }
    }

    /// A second run of the job while the first one (stopped with SIGSTOP in the middle of
    /// its copy, its temporary file on disk) holds the repository lock: with --lock-wait 0
    /// it exits 3 at once (a reader too), the first run's temporary file untouched; with a
    /// wait it blocks on the lock, and completes on top of the first run's point once the
    /// first run (continued) has finished.
    @Test(.requiresQEMU) func secondRunWaitsForTheLock() throws {
        let dir = try Self.scratch("lockwait")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "8M"], dir)
        try Self.backup(dir, day: 1)
        try B.tool(["qemu-io", "-c", "write -P 2 1M 1M", "vm.qcow2"], dir)
        // One byte per pwrite: the copy is slow enough to be stopped in the middle.
        let first = try Spawned("/usr/bin/env", ["QIMG_FAULTS=short-writes:1", Qimg.path, "backup", "--repo", "R", "--bitmap=daily",
                                                 "--time", "2026-01-02T02:00:00Z", "vm.qcow2"], cwd: dir)
        func temporaries() -> [String] {
            ((try? FileManager.default.contentsOfDirectory(atPath: dir + "/R/vm.qcow2")) ?? []).filter { $0.hasSuffix(".qimg-tmp") }
        }
        while temporaries().isEmpty && first.isRunning { usleep(2000) }
        first.send(SIGSTOP)
        defer { first.send(SIGCONT) }
        let held = temporaries()
        #expect(first.isRunning && held.count == 1, "the first run is stopped mid-copy: \(first.summary): \(first.err)")
        let manifest = try B.bytes(dir, "R/qimg-repository.json")
        for args in [["backup", "--repo", "R", "--bitmap=daily", "--time", "2026-01-03T02:00:00Z", "vm.qcow2"], ["repo", "list", "R"]] {
            let r = try Qimg.run(args + ["--lock-wait", "0"], cwd: dir)
            #expect(r.status == 3 && r.stderrLines.count == 1 && r.err.contains("locked"), "\(args): \(r.summary): \(r.err)")
        }
        #expect(temporaries() == held, "the first run's temporary file stays")
        #expect(try B.bytes(dir, "R/qimg-repository.json") == manifest)

        let second = try Spawned(Qimg.path, ["backup", "--repo", "R", "--bitmap=daily", "--time", "2026-01-03T02:00:00Z",
                                             "--output=json", "--lock-wait", "3600", "vm.qcow2"], cwd: dir)
        while !Self.hasOpen(second.pid, "/R/.lock") && second.isRunning { usleep(2000) }
        #expect(second.isRunning, "the second run waits: \(second.summary): \(second.err)")
        let waiting = try B.bytes(dir, "R/qimg-repository.json")
        #expect(temporaries() == held && waiting == manifest, "nothing changed while it waits")
        first.send(SIGCONT)
        #expect(first.wait(timeout: Runner.backstopSeconds) && first.status == 0, "\(first.summary): \(first.err)")
        #expect(second.wait(timeout: Runner.backstopSeconds) && second.status == 0, "\(second.summary): \(second.err)")
        let pts = try Self.points(dir)
        #expect(pts.map { $0["id"] as? String ?? "?" } == ["000001", "000002", "000003"], "\(pts)")
        #expect(pts.last?["parent"] as? String == "000002" && pts.last?["kind"] as? String == "incremental", "\(pts)")
        #expect(try Self.jobBitmaps(dir) == [pts.last?["bitmap"] as? String ?? "?"])
        try Self.expectRestores(dir, point: "000002", as: "vm.qcow2", "the first run's point")
        try Self.expectRepositoryClean(dir, "after both runs")
    }

    /// A lost manifest is rebuilt from the point files under the id the repository keeps in
    /// `qimg-repository.id`: the same ids, files, kinds and parents; every point restores;
    /// the next run continues the chain on the image's bitmap, and the image never holds
    /// more than one bitmap of the job (qemu-img info). A lost newest point with it: a full,
    /// and still one bitmap. A repository without the id file gets it back from its manifest.
    @Test(.requiresQEMU) func lostManifestIsRebuilt() throws {
        let dir = try Self.scratch("rebuild")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir)
        for day in 1...3 {
            try B.tool(["qemu-io", "-c", "write -P \(day) \(day * 256)k 100k", "vm.qcow2"], dir)
            try B.tool(["qemu-img", "convert", "-O", "qcow2", "vm.qcow2", "day\(day).qcow2"], dir)
            try Self.backup(dir, day: day)
        }
        let before = try Self.points(dir)
        unlink(dir + "/R/qimg-repository.json")
        let after = try Self.points(dir)
        #expect(after.count == 3)
        for (a, b) in zip(before, after) {
            for k in ["id", "file", "kind", "time", "virtual-size"] { #expect("\(a[k] ?? "-")" == "\(b[k] ?? "-")", "\(k)") }
            #expect((a["parent"] as? String) == (b["parent"] as? String))
        }
        for (i, p) in after.enumerated() { try Self.expectRestores(dir, point: p["id"] as? String ?? "?", as: "day\(i + 1).qcow2", "rebuilt") }
        try B.tool(["qemu-io", "-c", "write -P 4 3M 64k", "vm.qcow2"], dir)
        let next = try Self.backup(dir, day: 4)
        #expect(next["kind"] as? String == "incremental" && next["parent"] as? String == "000003" && next["id"] as? String == "000004", "\(next)")
        #expect(try Self.jobBitmaps(dir) == [next["bitmap"] as? String ?? "?"], "one bitmap of the job after the rebuild")
        try Self.expectRestores(dir, point: "000004", as: "vm.qcow2", "continued chain")

        // The manifest and the newest point's file lost: a full, and the old bitmap removed.
        unlink(dir + "/R/qimg-repository.json")
        unlink(dir + "/R/" + (next["file"] as? String ?? "?"))
        let full = try Self.backup(dir, day: 5)
        #expect(full["kind"] as? String == "full" && full["full-reason"] as? String == "bitmap missing", "\(full)")
        #expect(try Self.jobBitmaps(dir) == [full["bitmap"] as? String ?? "?"], "one bitmap of the job after a full")

        // A repository made before the id file: the next backup writes it from the manifest.
        let id = try String(contentsOfFile: dir + "/R/qimg-repository.id", encoding: .utf8)
        #expect(id.hasSuffix("\n") && (full["bitmap"] as? String ?? "").hasPrefix("daily@" + id.dropLast() + "."), "\(id)")
        unlink(dir + "/R/qimg-repository.id")
        try B.tool(["qemu-io", "-c", "write -P 6 0 4k", "vm.qcow2"], dir)
        try Self.backup(dir, day: 6)
        #expect(try String(contentsOfFile: dir + "/R/qimg-repository.id", encoding: .utf8) == id)
        unlink(dir + "/R/qimg-repository.json")
        try B.tool(["qemu-io", "-c", "write -P 7 4k 4k", "vm.qcow2"], dir)
        let last = try Self.backup(dir, day: 7)
        #expect(last["kind"] as? String == "incremental", "\(last)")
        #expect(try Self.jobBitmaps(dir) == [last["bitmap"] as? String ?? "?"])
        try Self.expectRepositoryClean(dir, "after the rebuilds")
        try expectCheckClean("vm.qcow2", dir, "the image")
    }

    /// An image a VM holds (qemu-storage-daemon with the image open read-write): exit 4,
    /// nothing added to the repository.
    @Test(.requiresStorageDaemon) func imageInUseExits4() throws {
        let dir = try Self.scratch("busy")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir)
        try Self.backup(dir, day: 1)
        let before = try B.bytes(dir, "R/qimg-repository.json")
        let daemon = try PipedProcess(Env.qemuStorageDaemon ?? "qemu-storage-daemon",
                                      ["--blockdev", "driver=file,node-name=f,filename=\(dir)/vm.qcow2",
                                       "--blockdev", "driver=qcow2,node-name=q,file=f", "--chardev", "stdio,id=m0", "--monitor", "chardev=m0"])
        defer { daemon.stop() }
        try daemon.waitForLine(containing: "\"QMP\"")
        let r = try Qimg.run(["backup", "--repo", "R", "--bitmap=daily", "vm.qcow2"], cwd: dir)
        #expect(r.status == 4 && r.stderrLines.count == 1 && r.err.contains("in use"), "\(r.summary): \(r.err)")
        #expect(try B.bytes(dir, "R/qimg-repository.json") == before)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/R/vm.qcow2").count == 1)
    }

    /// Damaged manifests (seeded byte flips, cuts, insertions) never crash qimg: exit 0 when
    /// the text still parses as a manifest, else exit 2 with one line; never a signal.
    @Test(.requiresQEMU) func damagedManifestsNeverCrash() throws {
        let dir = try Self.scratch("fuzz")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "4M"], dir)
        try B.tool(["qemu-io", "-c", "write -P 1 0 600k", "vm.qcow2"], dir)
        try Self.backup(dir, day: 1)
        try B.tool(["qemu-io", "-c", "write -P 2 1M 64k", "vm.qcow2"], dir)
        try Self.backup(dir, day: 2)
        let good = [UInt8](try B.bytes(dir, "R/qimg-repository.json"))
        var rng = SeededRNG(state: 1414)
        for round in 0..<150 {
            var b = good
            for _ in 0..<(1 + Int(rng.next() % 3)) {
                let at = Int(rng.next() % UInt64(b.count))
                switch rng.next() % 4 {
                case 0: b[at] = UInt8(truncatingIfNeeded: rng.next())
                case 1: b.removeSubrange(at..<min(b.count, at + Int(rng.next() % 40)))
                case 2: b.insert(contentsOf: Array("[{\"\\u12".utf8), at: at)
                default:
                    let syntax = Array("0123456789{}[]\",:-".utf8)
                    b[at] = syntax[Int(rng.next() % UInt64(syntax.count))]
                }
                if b.isEmpty { b = [0x7B] }
            }
            try Data(b).write(to: URL(fileURLWithPath: dir + "/R/qimg-repository.json"))
            for args in [["repo", "list", "--output=json", "R"], ["repo", "verify", "R"]] {
                let r = try Qimg.run(args, cwd: dir)
                #expect(r.exitedNormally && [0, 2].contains(r.status) && (r.status == 0 || r.stderrLines.count >= 1),
                        "round \(round) \(args): \(r.summary): \(r.err)")
            }
        }
    }

    /// SIGKILL at every write and every sync of an incremental repository run (odd writes
    /// torn in half): each killed run leaves the image with exactly one job bitmap, the old
    /// point's or the killed run's (the switch is atomic); the next run keeps the killed
    /// run's point exactly when the image holds its bitmap (the point's file and the switch
    /// are durable before the manifest records it), and otherwise takes its incremental on
    /// the old point again; the repository verifies, and every point restores to the disk
    /// of its day; nothing is left behind.
    @Test(.requiresQEMU) func killAtEveryWriteAndSync() throws {
        let dir = try Self.scratch("kill")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "vm.qcow2", "8M"], dir)
        try B.tool(["qemu-io", "-c", "write -P 1 0 1M", "vm.qcow2"], dir)
        try B.tool(["qemu-img", "convert", "-O", "qcow2", "vm.qcow2", "day1.qcow2"], dir)
        try Self.backup(dir, day: 1)
        // 80 scattered writes, each in its own cluster of the point (64 KiB): the copy is
        // many writes long (over 100 kill points in all).
        try B.tool(["qemu-io"] + (0..<80).flatMap { ["-c", "write -P \(2 + $0 % 5) \($0 * 96 + 8)k 4k"] } + ["vm.qcow2"], dir)
        try B.tool(["qemu-img", "convert", "-O", "qcow2", "vm.qcow2", "day2.qcow2"], dir)
        try Self.shell("cp -a R R.template && cp -a vm.qcow2 vm.template", dir)
        var kills = 0
        for kind in ["write", "sync"] {
            for n in 1..<400 {
                try? FileManager.default.removeItem(atPath: dir + "/R")
                unlink(dir + "/vm.qcow2")
                try Self.shell("cp -a R.template R && cp -a vm.template vm.qcow2", dir)
                let spec = "\(kind):\(n):kill\(kind == "write" && n % 2 == 1 ? ":partial" : "")"
                let r = try Runner.run("/usr/bin/env", ["QIMG_FAULTS=\(spec)", Qimg.path, "backup", "--repo", "R", "--bitmap=daily",
                                                        "--time", "2026-01-02T02:00:00Z", "vm.qcow2"], cwd: dir)
                if r.exitedNormally && r.status == 0 { break }
                #expect(r.signaled && r.status == SIGKILL, "\(spec): \(r.summary): \(r.err)")
                kills += 1
                try expectCheckClean("vm.qcow2", dir, spec, leaksAllowed: true)
                let bitmaps = try Self.jobBitmaps(dir)
                #expect(bitmaps.count == 1 && (bitmaps[0].hasSuffix(".000001") || bitmaps[0].hasSuffix(".000002")), "\(spec): \(bitmaps)")
                let switched = bitmaps.first?.hasSuffix(".000002") == true
                let renamed = (try FileManager.default.contentsOfDirectory(atPath: dir + "/R/vm.qcow2")).contains { $0.hasSuffix("-000002.qcow2") }
                // The next run completes: the newest point is the disk as it is now.
                let p = try Self.backup(dir, day: 3)
                try Self.expectRestores(dir, point: p["id"] as? String ?? "?", as: "vm.qcow2", "\(spec): next run")
                // A point id is never given twice, not even a killed run's that was removed.
                #expect(p["kind"] as? String == "incremental" && p["id"] as? String == (renamed ? "000003" : "000002"), "\(spec): \(p)")
                let pts = try Self.points(dir)
                #expect(pts.count == (switched ? 3 : 2), "\(spec): switched \(switched): \(pts.map { $0["id"] ?? "" })")
                #expect(pts.allSatisfy { $0["state"] as? String == "complete" }, "\(spec): \(pts)")
                try Self.expectRestores(dir, point: pts[0]["id"] as? String ?? "?", as: "day1.qcow2", "\(spec): first point")
                if pts.count == 3 { try Self.expectRestores(dir, point: pts[1]["id"] as? String ?? "?", as: "day2.qcow2", "\(spec): killed run's point") }
                let verify = try Qimg.run(["repo", "verify", "R"], cwd: dir)
                #expect(verify.status == 0, "\(spec): verify: \(verify.err)")
                let left = try FileManager.default.subpathsOfDirectory(atPath: dir + "/R").filter { $0.hasSuffix(".qimg-tmp") }
                #expect(left.isEmpty, "\(spec): left behind: \(left)")
            }
        }
        print("killAtEveryWriteAndSync: \(kills) kills")
        #expect(kills >= 100, "kill points: \(kills)")
    }
}
