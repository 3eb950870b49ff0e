import Foundation
import QCow2
import Testing
import TestSupport

/// A qemu-storage-daemon standing in for a running VM: node `disk0` (qcow2 over a throttle
/// filter whose read rate makes backup jobs last long enough to write during them), the
/// monitor qimg uses (`qmp.sock`), a second monitor for the test (`mon.sock`: QEMU serves
/// one client per monitor), and an NBD server whose writable export `disk0` is the guest.
final class LiveVM {
    let dir: String
    let daemon: Spawned
    let monitor: QMPConnection
    var qmpSocket: String { dir + "/qmp.sock" }
    var nbd: String { nbd("disk0") }

    /// Starts QSD on `images` (in `dir`; nodes disk0, disk1, ...) reading at most `readRate`
    /// bytes/s from each file.
    init(dir: String, images: [String], readRate: Int = 4 << 20) throws {
        guard let qsd = Env.qemuStorageDaemon else { throw TestFailure("qemu-storage-daemon not found on PATH (install qemu-system-common)") }
        self.dir = dir
        var args = ["--object", "throttle-group,id=tg0,x-bps-read=\(readRate)"]
        for (i, image) in images.enumerated() {
            args += ["--blockdev", "driver=file,node-name=file\(i),filename=\(dir)/\(image)",
                     "--blockdev", "driver=throttle,node-name=thr\(i),throttle-group=tg0,file=file\(i)",
                     "--blockdev", "driver=qcow2,node-name=disk\(i),file=thr\(i)"]
        }
        daemon = try Spawned(qsd, args + [
            "--chardev", "socket,path=\(dir)/qmp.sock,server=on,wait=off,id=m0", "--monitor", "chardev=m0",
            "--chardev", "socket,path=\(dir)/mon.sock,server=on,wait=off,id=m1", "--monitor", "chardev=m1",
            "--nbd-server", "addr.type=unix,addr.path=\(dir)/nbd.sock",
        ], cwd: dir)
        monitor = try Self.connect(dir + "/mon.sock", of: daemon)
        for i in images.indices {
            try monitor.execute("block-export-add", [("type", .string("nbd")), ("id", .string("exp\(i)")), ("node-name", .string("disk\(i)")),
                                                     ("name", .string("disk\(i)")), ("writable", .bool(true))])
        }
    }

    /// The socket exists once QEMU listens: polls until the monitor answers (or QEMU exits).
    static func connect(_ socket: String, of process: Spawned) throws -> QMPConnection {
        while true {
            if !process.isRunning { throw TestFailure("\(process.command) exited: \(process.err)") }
            if let m = try? QMPConnection(socket: socket) { return m }
            usleep(5_000)
        }
    }

    convenience init(dir: String, image: String, readRate: Int = 4 << 20) throws {
        try self.init(dir: dir, images: [image], readRate: readRate)
    }

    /// Stops QEMU the clean way (`quit`): persistent bitmaps are stored in the image files.
    func quit() throws {
        _ = try? monitor.tryExecute("quit")
        daemon.wait(timeout: 600)
        monitor.close()
    }

    func nbd(_ node: String) -> String { "nbd+unix:///\(node)?socket=\(dir)/nbd.sock" }

    deinit { stop() }

    func stop() {
        monitor.close()
        daemon.send(SIGKILL)
        daemon.wait(timeout: 60)
    }

    /// A guest write through the NBD export.
    func write(_ pattern: Int, _ offset: Int, _ length: Int, node: String = "disk0") throws {
        let r = try Runner.qemuIO(["-f", "raw", nbd(node), "-c", "write -P \(pattern) \(offset) \(length)"], cwd: dir)
        #expect(r.status == 0, "\(r.summary)")
    }

    func bitmap(_ name: String, node: String = "disk0") throws -> LiveBitmap? { try LiveNodes.find(node, monitor).bitmap(name) }

    func qimgLeftovers() throws -> [String] { try Self.qimgLeftovers(monitor) }

    /// Names of qimg's jobs, nodes and bitmaps present in the QEMU of `monitor`.
    static func qimgLeftovers(_ monitor: QMPConnection) throws -> [String] {
        var names: [String] = []
        if case .array(let jobs) = try monitor.execute("query-jobs") {
            for j in jobs { if case .string(let id)? = j["id"], id.hasPrefix("qimg-") { names.append(id) } }
        }
        for n in try LiveNodes.all(monitor) {
            if n.name.hasPrefix("qimg-") { names.append(n.name) }
            names += n.bitmaps.map(\.name).filter { $0.hasPrefix("qimg-") }
        }
        return names
    }

    /// Waits until a qimg job runs (true) or `qimg` exits first (false).
    func waitForRunningJob(_ qimg: Spawned) throws -> Bool {
        while qimg.isRunning {
            if try runningJob() != nil { return true }
            usleep(2_000)
        }
        return false
    }

    /// The id of a running qimg job, if any.
    func runningJob() throws -> String? {
        guard case .array(let jobs) = try monitor.execute("query-jobs") else { return nil }
        for job in jobs {
            if case .string(let id)? = job["id"], id.hasPrefix("qimg-"), job["status"] == .string("running") { return id }
        }
        return nil
    }
}

@Suite(.serialized, .requiresStorageDaemon) struct LiveBackupTests {
    /// A 64 MiB disk with 6 MiB of data (0x11), and a copy of it taken before QEMU opens it.
    func makeDisk(_ dir: String) throws {
        #expect(try Runner.qemuImg(["create", "-q", "-f", "qcow2", "disk.qcow2", "64M"], cwd: dir).status == 0)
        #expect(try Runner.qemuIO(["-f", "qcow2", "disk.qcow2", "-c", "write -P 0x11 0 6M"], cwd: dir).status == 0)
        #expect(try Runner.qemuImg(["convert", "-f", "qcow2", "-O", "qcow2", "disk.qcow2", "start.qcow2"], cwd: dir).status == 0)
    }

    func qimg(_ args: [String], _ dir: String) throws -> Spawned { try Spawned(Qimg.path, ["backup"] + args, cwd: dir) }

    func dataExtents(_ file: String, _ dir: String) throws -> [[Int]] {
        let r = try Runner.qemuImg(["map", "--output=json", file], cwd: dir)
        let list = try JSONSerialization.jsonObject(with: r.stdout) as? [[String: Any]] ?? []
        return list.filter { ($0["depth"] as? Int) == 0 && ($0["data"] as? Bool) == true }.map { [$0["start"] as! Int, $0["length"] as! Int] }
    }

    func compare(_ a: [String], _ dir: String) throws -> RunResult { try Runner.qemuImg(["compare"] + a, cwd: dir) }

    @Test func fullDuringWritesEqualsTheStartAndTheNextIncrementalCarriesThoseWrites() throws {
        let dir = try Paths.newScratch("live-push")
        try makeDisk(dir)
        let vm = try LiveVM(dir: dir, image: "disk.qcow2", readRate: 3 << 20)
        defer { vm.stop() }
        let full = try qimg(["--qmp", vm.qmpSocket, "--node", "disk0", "--bitmap", "bm0", "full.qcow2"], dir)
        #expect(try vm.waitForRunningJob(full), "the job ended before the guest wrote")
        // The job is paused while the guest writes, so that the writes land while it runs
        // whatever the machine's load (no race with the copy's speed).
        let job = try vm.runningJob()
        if let job { _ = try vm.monitor.execute("job-pause", [("id", .string(job))]) }
        try vm.write(0x22, 1 << 20, 64 << 10)       // inside the data being copied
        try vm.write(0x33, 10 << 20, 128 << 10)     // where the disk had nothing
        let stillRunning = try vm.qimgLeftovers().contains { $0.hasPrefix("qimg-backup-") }
        #expect(stillRunning, "the writes must land while the job runs")
        if let job { _ = try vm.monitor.execute("job-resume", [("id", .string(job))]) }
        full.wait(timeout: 600)
        #expect(full.status == 0 && !full.signaled, "\(full.summary): \(full.err)")
        try expectCheckClean("full.qcow2", dir, "full")
        #expect(try compare(["-f", "qcow2", "-F", "qcow2", "start.qcow2", "full.qcow2"], dir).status == 0, "the full backup is the disk as it was at the start")
        #expect(try vm.bitmap("bm0")?.count == 192 << 10, "bm0 holds exactly the writes made during the job")

        let inc = try qimg(["--qmp", vm.qmpSocket, "--node", "disk0", "--sync=incremental", "--bitmap", "bm0", "-b", "full.qcow2", "-F", "qcow2", "inc1.qcow2"], dir)
        inc.wait(timeout: 600)
        #expect(inc.status == 0 && !inc.signaled, "\(inc.summary): \(inc.err)")
        try expectCheckClean("inc1.qcow2", dir, "inc1")
        #expect(try dataExtents("inc1.qcow2", dir) == [[1 << 20, 64 << 10], [10 << 20, 128 << 10]])
        let same = try compare(["-f", "raw", "-F", "qcow2", vm.nbd, "inc1.qcow2"], dir)
        #expect(same.status == 0, "restore point inc1 equals the disk: \(same.out) \(same.err)")
        #expect(try vm.bitmap("bm0")?.count == 0)
        #expect(try vm.qimgLeftovers() == [])
        #expect(!(try FileManager.default.contentsOfDirectory(atPath: dir).contains { $0.hasSuffix(".qimg-tmp") }))
    }

    /// A VM whose disk0 has bm0 (made by a full backup into full.qcow2) and `dirty` bytes
    /// written since (pattern 0x44 at 20 MiB).
    func vmWithDirtyBitmap(_ dir: String, dirty: Int = 2 << 20, readRate: Int = 4 << 20) throws -> LiveVM {
        try makeDisk(dir)
        let vm = try LiveVM(dir: dir, image: "disk.qcow2", readRate: readRate)
        let full = try qimg(["--qmp", vm.qmpSocket, "--node", "disk0", "--bitmap", "bm0", "full.qcow2"], dir)
        full.wait(timeout: 600)
        #expect(full.status == 0, "\(full.summary): \(full.err)")
        if dirty > 0 { try vm.write(0x44, 20 << 20, dirty) }
        return vm
    }

    func sha(_ vm: LiveVM, _ name: String) throws -> JSON? {
        try vm.monitor.execute("x-debug-block-dirty-bitmap-sha256", [("node", .string("disk0")), ("name", .string(name))])["sha256"]
    }

    func incremental(_ vm: LiveVM, _ target: String, bitmap: String = "bm0") -> [String] {
        ["--qmp", vm.qmpSocket, "--node", "disk0", "--sync=incremental", "--bitmap", bitmap, "-b", "full.qcow2", "-F", "qcow2", target]
    }

    func noTemporaries(_ dir: String) throws -> Bool {
        !(try FileManager.default.contentsOfDirectory(atPath: dir).contains { $0.hasSuffix(".qimg-tmp") })
    }

    @Test func refusalsAreOneLineWithTheirOwnExitCode() throws {
        let dir = try Paths.newScratch("live-refuse")
        let vm = try vmWithDirtyBitmap(dir)
        defer { vm.stop() }
        try vm.monitor.execute("block-dirty-bitmap-add", [("node", .string("disk0")), ("name", .string("off")), ("disabled", .bool(true))])
        try vm.monitor.execute("block-dirty-bitmap-add", [("node", .string("disk0")), ("name", .string("used"))])
        try vm.monitor.execute("block-export-add", [("type", .string("nbd")), ("id", .string("busy")), ("node-name", .string("disk0")),
                                                    ("name", .string("busy")), ("writable", .bool(true)), ("bitmaps", .array([.string("used")]))])
        let before = try sha(vm, "bm0")
        let sock = vm.qmpSocket
        let cases: [([String], Int32, String)] = [
            (["--qmp", sock, "--node", "nope", "t.qcow2"], 12, "no block node, device or qdev named 'nope'"),
            (incremental(vm, "t.qcow2", bitmap: "missing"), 13, "node 'disk0' has no bitmap 'missing'"),
            (incremental(vm, "t.qcow2", bitmap: "off"), 14, "bitmap 'off' of node 'disk0' is disabled"),
            (incremental(vm, "t.qcow2", bitmap: "used"), 15, "bitmap 'used' of node 'disk0' is in use"),
            (["--qmp", dir + "/no.sock", "--node", "disk0", "t.qcow2"], 10, "cannot connect to the QMP socket: No such file or directory"),
        ]
        for (args, code, text) in cases {
            let r = try Qimg.run(["backup"] + args, cwd: dir)
            #expect(r.status == code, "\(r.summary): \(r.err)")
            #expect(r.stderrLines.count == 1 && r.err.hasPrefix("qimg: \(args[1]): \(text)"), "\(r.err)")
            #expect(!FileManager.default.fileExists(atPath: dir + "/t.qcow2"))
        }
        #expect(try noTemporaries(dir))
        #expect(try sha(vm, "bm0") == before)
        #expect(try vm.qimgLeftovers() == [])
    }

    @Test(arguments: [(SIGTERM, Int32(143)), (SIGINT, Int32(130))])
    func aSignalCancelsTheJobAndTheBitmapKeepsItsBitsPlusTheNewWrites(sig: Int32, code: Int32) throws {
        let dir = try Paths.newScratch("live-cancel")
        let vm = try vmWithDirtyBitmap(dir, dirty: 4 << 20, readRate: 2 << 20)
        defer { vm.stop() }
        let before = try #require(try vm.bitmap("bm0")).count
        let run = try qimg(incremental(vm, "inc.qcow2"), dir)
        #expect(try vm.waitForRunningJob(run), "the job ended before the signal")
        try vm.write(0x55, 40 << 20, 128 << 10)
        run.send(sig)
        run.wait(timeout: 600)
        #expect(run.status == code && !run.signaled, "\(run.summary): \(run.err)")
        #expect(run.stderrLines.count == 1 && run.err.contains("inc.qcow2 was not written and the bitmap keeps its bits"), "\(run.err)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/inc.qcow2"))
        #expect(try noTemporaries(dir))
        #expect(try vm.bitmap("bm0")?.count == before + (128 << 10))
        #expect(try vm.qimgLeftovers() == [])
    }

    @Test func aFullTargetDiskFailsTheJobAndKeepsTheBitmap() throws {
        let dir = try Paths.newScratch("live-enospc")
        let vm = try vmWithDirtyBitmap(dir, dirty: 4 << 20)
        defer { vm.stop() }
        let small = dir + "/small"
        let fs = try SmallFilesystem(at: small)
        defer { fs.unmount() }
        let before = try sha(vm, "bm0")
        let r = try Qimg.run(["backup", "--qmp", vm.qmpSocket, "--node", "disk0", "--sync=incremental", "--bitmap", "bm0",
                              "-b", "../full.qcow2", "-F", "qcow2", "small/inc.qcow2"], cwd: dir, timeout: 600)
        // 5, as any backup whose target's disk is full (the repository's code for the cause).
        #expect(r.status == 5, "\(r.summary): \(r.err)")
        #expect(r.stderrLines.count == 1 && r.err.hasPrefix("qimg: \(vm.qmpSocket): backup of node 'disk0' failed: No space left on device"), "\(r.err)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: small) == [])
        #expect(try sha(vm, "bm0") == before)
        #expect(try vm.qimgLeftovers() == [])
    }

    @Test func theSocketGoneMidJobLeavesNoTarget() throws {
        let dir = try Paths.newScratch("live-gone")
        let vm = try vmWithDirtyBitmap(dir, dirty: 4 << 20, readRate: 2 << 20)
        let run = try qimg(incremental(vm, "inc.qcow2"), dir)
        #expect(try vm.waitForRunningJob(run))
        vm.stop()
        run.wait(timeout: 600)
        #expect(run.status == 10, "\(run.summary): \(run.err)")
        #expect(run.stderrLines.count == 1 && run.err.hasPrefix("qimg: \(vm.qmpSocket): QEMU closed the monitor connection"), "\(run.err)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/inc.qcow2"))
        #expect(try noTemporaries(dir))
    }

    /// A QEMU that stops answering (SIGSTOP here; a hung VM alike) while the job runs: the run
    /// fails with 10 once --qmp-timeout passes (the silent monitor is asked query-status), no
    /// target appears; once QEMU goes on, the next run ends the abandoned job, and its backup
    /// holds every bit the first one should have copied.
    @Test func aStoppedQEMUFailsTheRunAfterTheQMPTimeout() throws {
        let dir = try Paths.newScratch("live-stopped")
        let vm = try vmWithDirtyBitmap(dir, dirty: 4 << 20, readRate: 1 << 20)
        defer { vm.stop() }
        let run = try qimg(["--qmp-timeout", "1"] + incremental(vm, "inc.qcow2"), dir)
        #expect(try vm.waitForRunningJob(run), "the job ended before QEMU was stopped")
        vm.daemon.send(SIGSTOP)
        run.wait(timeout: 600)
        vm.daemon.send(SIGCONT)
        #expect(run.status == 10, "\(run.summary): \(run.err)")
        #expect(run.stderrLines.count == 1
                && run.err.hasPrefix("qimg: \(vm.qmpSocket): QEMU did not answer query-status within 1 s (is it stopped or hung?)"), "\(run.err)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/inc.qcow2"))
        #expect(try noTemporaries(dir))
        let again = try Qimg.run(["backup"] + incremental(vm, "inc.qcow2"), cwd: dir, timeout: 600)
        #expect(again.status == 0, "\(again.summary): \(again.err)")
        #expect(try dataExtents("inc.qcow2", dir) == [[20 << 20, 4 << 20]])
        #expect(try vm.qimgLeftovers() == [])
    }

    /// SIGKILL at random moments: QEMU keeps answering, no target appears half-made, and the
    /// next run (a bitmap copy that leaves the bitmap alone) removes what the killed run left
    /// and finds every bit written since the last completed backup.
    @Test func killedRunsLoseNoBitAndTheNextRunCleansUp() throws {
        let dir = try Paths.newScratch("live-kill")
        let vm = try vmWithDirtyBitmap(dir, dirty: 1 << 20, readRate: 8 << 20)
        defer { vm.stop() }
        var rng = SeededRNG(state: 0x5eed_0015)
        var pending: [[Int]] = [[20 << 20, 1 << 20]]
        for i in 0..<50 {
            let at = (24 << 20) + i * (256 << 10)
            try vm.write(0x60 + i % 16, at, 64 << 10)
            pending.append([at, 64 << 10])
            let run = try qimg(incremental(vm, "inc.qcow2"), dir)
            usleep(UInt32.random(in: 0...400_000, using: &rng))
            run.send(SIGKILL)
            run.wait(timeout: 600)
            #expect(try vm.monitor.execute("query-jobs") != .null, "QEMU answers after kill \(i)")
            if FileManager.default.fileExists(atPath: dir + "/inc.qcow2") {
                // The run got as far as the rename: a complete backup of what was pending.
                try expectCheckClean("inc.qcow2", dir, "kill \(i)")
                try FileManager.default.removeItem(atPath: dir + "/inc.qcow2")
                pending = []
            }
            let check = try Qimg.run(["backup", "--qmp", vm.qmpSocket, "--node", "disk0", "--sync=bitmap", "--bitmap", "bm0",
                                      "--bitmap-mode", "never", "--no-backing", "check.qcow2"], cwd: dir, timeout: 600)
            #expect(check.status == 0, "after kill \(i): \(check.summary): \(check.err)")
            let found = try dataExtents("check.qcow2", dir)
            for p in pending {
                #expect(found.contains { $0[0] <= p[0] && p[0] + p[1] <= $0[0] + $0[1] }, "after kill \(i): the bitmap lost \(p)")
            }
            try FileManager.default.removeItem(atPath: dir + "/check.qcow2")
            #expect(try vm.qimgLeftovers() == [], "after kill \(i)")
            #expect(try noTemporaries(dir), "after kill \(i)")
        }
    }

    // MARK: - Several disks into a repository

    /// `count` disks of 64 MiB with 2 MiB of data each (pattern 0x70 + i).
    func makeDisks(_ dir: String, _ count: Int) throws -> [String] {
        try (0..<count).map { i throws -> String in
            let name = "d\(i).qcow2"
            #expect(try Runner.qemuImg(["create", "-q", "-f", "qcow2", name, "64M"], cwd: dir).status == 0)
            #expect(try Runner.qemuIO(["-f", "qcow2", name, "-c", "write -P \(0x70 + i) \(i)M 2M"], cwd: dir).status == 0)
            return name
        }
    }

    func repoBackup(_ vm: LiveVM, _ nodes: Int, repo: String = "R", day: Int) throws -> Spawned {
        try qimg(["--qmp", vm.qmpSocket] + (0..<nodes).flatMap { ["--node", "disk\($0)"] } +
                 ["--repo", repo, "--bitmap", "daily", "--time", "2026-12-0\(day)T02:00:00Z"], vm.dir)
    }

    /// Waits for a run that must succeed.
    func finishedRun(_ run: Spawned, sourceLocation: SourceLocation = #_sourceLocation) {
        run.wait(timeout: 600)
        #expect(run.status == 0 && !run.signaled, "\(run.summary): \(run.err)", sourceLocation: sourceLocation)
    }

    func manifestBytes(_ dir: String) throws -> Data { try Data(contentsOf: URL(fileURLWithPath: dir + "/R/qimg-repository.json")) }

    /// Per chain, the points' (kind, file) from the manifest.
    func points(_ dir: String, repo: String = "R") throws -> [String: [(String, String)]] {
        let data = try Data(contentsOf: URL(fileURLWithPath: "\(dir)/\(repo)/qimg-repository.json"))
        let m = try JSONSerialization.jsonObject(with: data) as? [String: Any] ?? [:]
        var out: [String: [(String, String)]] = [:]
        for image in m["images"] as? [[String: Any]] ?? [] {
            out[image["image"] as? String ?? ""] = (image["points"] as? [[String: Any]] ?? []).map { ($0["kind"] as? String ?? "", $0["file"] as? String ?? "") }
        }
        return out
    }

    func jobBitmaps(_ vm: LiveVM, _ node: String) throws -> [String: JSON?] {
        var out: [String: JSON?] = [:]
        for b in try LiveNodes.find(node, vm.monitor).bitmaps where b.name.hasPrefix("daily@") {
            out[b.name] = try vm.monitor.execute("x-debug-block-dirty-bitmap-sha256", [("node", .string(node)), ("name", .string(b.name))])["sha256"]
        }
        return out
    }

    @Test func threeDisksInOneTransactionThenIncrementalsThatRestore() throws {
        let dir = try Paths.newScratch("live-repo3")
        let vm = try LiveVM(dir: dir, images: try makeDisks(dir, 3))
        defer { vm.stop() }
        try finishedRun(repoBackup(vm, 3, day: 1))
        for i in 0..<3 { try vm.write(0x90 + i, (30 + i) << 20, 64 << 10, node: "disk\(i)") }
        try finishedRun(repoBackup(vm, 3, day: 2))
        let p = try points(dir)
        for i in 0..<3 {
            let chain = try #require(p["disk\(i)"])
            #expect(chain.map(\.0) == ["full", "incremental"], "disk\(i): \(chain)")
            guard chain.count == 2 else { continue }
            try expectCheckClean("R/" + chain[1].1, dir, "disk\(i) day 2")
            #expect(try dataExtents("R/" + chain[1].1, dir) == [[(30 + i) << 20, 64 << 10]], "disk\(i): the incremental holds the day's write")
            let same = try compare(["-f", "raw", "-F", "qcow2", vm.nbd("disk\(i)"), "R/" + chain[1].1], dir)
            #expect(same.status == 0, "disk\(i) restores: \(same.out) \(same.err)")
            #expect(try jobBitmaps(vm, "disk\(i)").count == 1, "one job bitmap per node")
        }
        #expect(try vm.qimgLeftovers() == [])
    }

    /// `--output=json` in a live repository run: an array with, per disk, the object an offline
    /// `backup --repo --output=json` prints, checked against what the point files hold (qemu-img map).
    @Test func liveRepositoryRunsPrintEachPointAsJSON() throws {
        let dir = try Paths.newScratch("live-repo-json")
        let vm = try LiveVM(dir: dir, images: try makeDisks(dir, 2))
        defer { vm.stop() }
        func run(day: Int) throws -> [[String: Any]] {
            let r = try qimg(["--qmp", vm.qmpSocket, "--node", "disk0", "--node", "disk1", "--repo", "R", "--bitmap", "daily",
                              "--time", "2026-12-0\(day)T02:00:00Z", "--output=json"], dir)
            finishedRun(r)
            let points = try #require(JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [[String: Any]], "\(r.out)")
            #expect(points.count == 2, "one object per disk: \(r.out)")
            return points
        }
        let first = try run(day: 1)
        for i in 0..<2 { try vm.write(0x90 + i, (30 + i) << 20, 64 << 10, node: "disk\(i)") }
        let second = try run(day: 2)
        let files = try points(dir)
        for (i, (a, b)) in zip(first, second).enumerated() {
            #expect(a["image"] as? String == "disk\(i)" && b["image"] as? String == "disk\(i)")
            #expect(a["kind"] as? String == "full" && a["parent"] is NSNull && a["full-reason"] as? String != nil, "\(a)")
            #expect(b["kind"] as? String == "incremental" && b["parent"] as? String == a["id"] as? String && b["full-reason"] is NSNull, "\(b)")
            #expect(a["time"] as? String == "2026-12-01T02:00:00Z" && b["time"] as? String == "2026-12-02T02:00:00Z")
            #expect(a["virtual-size"] as? Int == 64 << 20 && b["virtual-size"] as? Int == 64 << 20)
            #expect([a["file"] as? String, b["file"] as? String] == (files["disk\(i)"] ?? []).map { Optional($0.1) })
            // Bytes copied: what each file holds as its own data (2 MiB written before, 64 KiB on day 2).
            let held = { (f: String) in try self.dataExtents("R/" + f, dir).reduce(0) { $0 + $1[1] } }
            #expect(a["bytes-copied"] as? Int == (try held(a["file"] as? String ?? "")) && a["bytes-copied"] as? Int == 2 << 20, "\(a)")
            #expect(b["bytes-copied"] as? Int == 64 << 10, "\(b)")
        }
    }

    /// One of three jobs fails (cancelled from outside, as QEMU ends a failed job): the
    /// others are cancelled, no point is kept for any disk, every bitmap keeps its bits.
    @Test func oneFailingJobOfThreeKeepsNoPointAndEveryBitmap() throws {
        let dir = try Paths.newScratch("live-repo-fail")
        let vm = try LiveVM(dir: dir, images: try makeDisks(dir, 3), readRate: 2 << 20)
        defer { vm.stop() }
        try finishedRun(repoBackup(vm, 3, day: 1))
        for i in 0..<3 { try vm.write(0x90 + i, (30 + i) << 20, 2 << 20, node: "disk\(i)") }
        let before = try (0..<3).map { try jobBitmaps(vm, "disk\($0)") }
        let manifest = try manifestBytes(dir)
        let day2 = try repoBackup(vm, 3, day: 2)
        #expect(try vm.waitForRunningJob(day2))
        guard case .array(let jobs) = try vm.monitor.execute("query-jobs"),
              case .string(let victim)? = jobs.compactMap({ $0["id"] }).first(where: { if case .string(let s) = $0 { return s.hasSuffix("-1") }; return false })
        else { Issue.record("no job for disk1"); return }
        _ = try vm.monitor.tryExecute("job-cancel", [("id", .string(victim))])
        day2.wait(timeout: 600)
        #expect(day2.status == 1 && day2.stderrLines.count == 1, "\(day2.summary): \(day2.err)")
        #expect(day2.err.contains("no target was written and every bitmap keeps its bits"), "\(day2.err)")
        #expect(try manifestBytes(dir) == manifest)
        #expect(try (0..<3).map { try jobBitmaps(vm, "disk\($0)") } == before)
        for i in 0..<3 { #expect(try FileManager.default.contentsOfDirectory(atPath: "\(dir)/R/disk\(i)").count == 1) }
        #expect(try vm.qimgLeftovers() == [])
    }

    /// Two disks, the second's chain directory a full 1 MiB tmpfs: its full backup fails
    /// with ENOSPC (exit 5, the repository's code for it), the first disk's incremental is
    /// cancelled, no point is added, the first disk's bitmap keeps its bits and the second
    /// gets none.
    @Test func twoDisksOneTargetFullKeepsNothing() throws {
        let dir = try Paths.newScratch("live-repo-nospc")
        let vm = try LiveVM(dir: dir, images: try makeDisks(dir, 2), readRate: 2 << 20)
        defer { vm.stop() }
        try finishedRun(repoBackup(vm, 1, day: 1))
        try vm.write(0x99, 40 << 20, 2 << 20)
        let before = try jobBitmaps(vm, "disk0")
        let manifest = try manifestBytes(dir)
        let fs = try SmallFilesystem(at: dir + "/R/disk1")
        defer { fs.unmount() }
        let run = try repoBackup(vm, 2, day: 2)
        run.wait(timeout: 600)
        // 5: the code an offline repository run gives a full disk.
        #expect(run.status == 5 && run.stderrLines.count == 1, "\(run.summary): \(run.err)")
        #expect(run.err.contains("No space left on device") && run.err.contains("no target was written and every bitmap keeps its bits"), "\(run.err)")
        #expect(try manifestBytes(dir) == manifest)
        #expect(try jobBitmaps(vm, "disk0") == before && jobBitmaps(vm, "disk1").isEmpty)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/R/disk0").count == 1)
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/R/disk1") == [])
        #expect(try vm.qimgLeftovers() == [])
    }

    /// Bitmap granularities against target cluster sizes: a full into a bitmap made with
    /// that granularity, guest writes at unaligned offsets, an incremental; each point
    /// checks clean and restores the disk.
    @Test(arguments: [(4096, 2 << 20), (1 << 20, 4096), (65536, 65536), (512 << 10, 16384)])
    func granularityAgainstClusterSize(granularity: Int, cluster: Int) throws {
        let dir = try Paths.newScratch("live-gran")
        try makeDisk(dir)
        let vm = try LiveVM(dir: dir, image: "disk.qcow2", readRate: 64 << 20)
        defer { vm.stop() }
        try vm.monitor.execute("block-dirty-bitmap-add", [("node", .string("disk0")), ("name", .string("g")), ("persistent", .bool(true)),
                                                          ("granularity", .uint(UInt64(granularity)))])
        let o = ["-o", "cluster_size=\(cluster)"]
        try finishedRun(qimg(["--qmp", vm.qmpSocket, "--node", "disk0", "--bitmap", "g"] + o + ["full.qcow2"], dir))
        try vm.write(0x21, 3 * 4096 + 512, 5000)
        try vm.write(0x22, (17 << 20) + 12345, 70000)
        try finishedRun(qimg(["--qmp", vm.qmpSocket, "--node", "disk0", "--sync=incremental", "--bitmap", "g", "-b", "full.qcow2", "-F", "qcow2"] + o + ["inc.qcow2"], dir))
        for f in ["full.qcow2", "inc.qcow2"] { try expectCheckClean(f, dir, "\(f) g=\(granularity) c=\(cluster)") }
        #expect(try compare(["-f", "qcow2", "-F", "qcow2", "start.qcow2", "full.qcow2"], dir).status == 0)
        let same = try compare(["-f", "raw", "-F", "qcow2", vm.nbd, "inc.qcow2"], dir)
        #expect(same.status == 0, "g=\(granularity) c=\(cluster): \(same.out) \(same.err)")
        #expect(try vm.bitmap("g")?.count == 0)
    }

    /// One chain, offline and live in turn (the VM shut down one night, running the next):
    /// each point restores what the disk held at its run.
    @Test func offlineAndLiveRunsShareOneChain() throws {
        let dir = try Paths.newScratch("live-interleave")
        try makeDisk(dir)
        func offline(_ day: Int) throws {
            let r = try Qimg.run(["backup", "--repo", "R", "--bitmap", "daily", "--name", "vm", "--time", "2026-12-0\(day)T02:00:00Z", "disk.qcow2"], cwd: dir)
            #expect(r.status == 0, "offline day \(day): \(r.summary): \(r.err)")
            #expect(try Runner.qemuImg(["convert", "-O", "qcow2", "disk.qcow2", "day\(day).qcow2"], cwd: dir).status == 0)
        }
        try offline(1)
        #expect(try Runner.qemuIO(["-f", "qcow2", "disk.qcow2", "-c", "write -P 0x31 8M 64k"], cwd: dir).status == 0)
        let vm = try LiveVM(dir: dir, image: "disk.qcow2", readRate: 64 << 20)
        try vm.write(0x32, 9 << 20, 64 << 10)
        try finishedRun(qimg(["--qmp", vm.qmpSocket, "--node", "disk0", "--name", "vm", "--repo", "R", "--bitmap", "daily",
                              "--time", "2026-12-02T02:00:00Z"], dir))
        #expect(try Runner.qemuImg(["convert", "-f", "raw", "-O", "qcow2", vm.nbd, "day2.qcow2"], cwd: dir).status == 0)
        try vm.write(0x33, 10 << 20, 64 << 10)
        try vm.quit()
        try offline(3)
        let p = try #require(try points(dir)["vm"])
        #expect(p.map(\.0) == ["full", "incremental", "incremental"], "\(p)")
        for (day, point) in p.enumerated() {
            try expectCheckClean("R/" + point.1, dir, "day \(day + 1)")
            let same = try compare(["-f", "qcow2", "-F", "qcow2", "day\(day + 1).qcow2", "R/" + point.1], dir)
            #expect(same.status == 0, "day \(day + 1) restores: \(same.out) \(same.err)")
        }
        if p.count == 3 { #expect(try dataExtents("R/" + p[2].1, dir) == [[10 << 20, 64 << 10]]) }
    }

    /// A real qemu-system-x86_64 (-machine none, no guest): the disk is a `-drive` whose
    /// device id names it; guest writes are HMP `qemu-io` through QMP. After a clean quit
    /// the image equals full + incremental, which holds exactly those writes.
    @Test func qemuSystemDriveByDeviceID() throws {
        guard let qemu = Env.which("qemu-system-x86_64") else {
            if Env.isCI { throw TestFailure("qemu-system-x86_64 is missing (Debian: qemu-system-x86)") }
            print("LiveBackupTests.qemuSystemDriveByDeviceID: qemu-system-x86_64 not installed"); return
        }
        let dir = try Paths.newScratch("live-system")
        try makeDisk(dir)
        let vm = try Spawned(qemu, ["-machine", "none", "-nodefaults", "-display", "none",
                                    "-qmp", "unix:\(dir)/qmp.sock,server=on,wait=off", "-qmp", "unix:\(dir)/mon.sock,server=on,wait=off",
                                    "-drive", "if=none,id=legacy0,file=\(dir)/disk.qcow2,format=qcow2"], cwd: dir)
        defer { vm.send(SIGKILL); vm.wait(timeout: 600) }
        let m = try LiveVM.connect(dir + "/mon.sock", of: vm)
        func guestWrite(_ command: String) throws {
            let r = try m.execute("human-monitor-command", [("command-line", .string("qemu-io legacy0 \"\(command)\""))])
            #expect(r == .string(""), "qemu-io \(command): \(r)")
        }
        try finishedRun(qimg(["--qmp", dir + "/qmp.sock", "--node", "legacy0", "--bitmap", "b", "full.qcow2"], dir))
        try guestWrite("write -P 0x5a 1M 64k")
        try guestWrite("write -P 0x5b 33M 128k")
        try finishedRun(qimg(["--qmp", dir + "/qmp.sock", "--node", "legacy0", "--sync=incremental", "--bitmap", "b", "-b", "full.qcow2", "-F", "qcow2", "inc.qcow2"], dir))
        _ = try m.tryExecute("quit")
        vm.wait(timeout: 600)
        for f in ["full.qcow2", "inc.qcow2"] { try expectCheckClean(f, dir, f) }
        #expect(try compare(["-f", "qcow2", "-F", "qcow2", "start.qcow2", "full.qcow2"], dir).status == 0)
        #expect(try compare(["-f", "qcow2", "-F", "qcow2", "disk.qcow2", "inc.qcow2"], dir).status == 0)
        #expect(try dataExtents("inc.qcow2", dir) == [[1 << 20, 64 << 10], [33 << 20, 128 << 10]])
    }

    /// Usage errors of the live options: one line, exit 1, nothing created, no QEMU needed.
    @Test func liveUsageErrors() throws {
        let dir = try Paths.newScratch("live-usage")
        let cases: [([String], String)] = [
            (["--qmp", "q.sock", "t.qcow2"], "qimg: q.sock: --qmp needs --node NODE"),
            (["--qmp", "q.sock", "--node", "a", "--node", "b", "t.qcow2"], "qimg: q.sock: several --node need --repo DIR"),
            (["--node", "a", "img.qcow2", "t.qcow2"], "qimg: img.qcow2: --node applies only with --qmp"),
            (["--qmp", "q.sock", "--node", "a", "--sync=bitmap", "--bitmap", "b", "--bitmap-mode", "always", "--no-backing", "t.qcow2"],
             "qimg: q.sock: bitmap mode 'always' is not available for a running disk"),
            (["--qmp", "q.sock", "--node", "a", "--sync=top", "--no-backing", "t.qcow2"], "qimg: q.sock: sync=top is not available for a running disk"),
            (["--qmp", "q.sock", "--node", "a", "--sync=incremental", "--bitmap", "b", "t.qcow2"], "qimg: q.sock: sync=incremental needs -b PREV"),
            (["--qmp", "q.sock", "--node", "a", "--repo", "R", "t.qcow2"], "qimg: q.sock: --repo needs --bitmap=NAME"),
            (["--qmp", "q.sock", "--node", "a", "--node", "b", "--name", "x", "--repo", "R", "--bitmap", "d"], "qimg: q.sock: 1 chain names for 2 nodes"),
            (["--qmp-timeout", "5", "img.qcow2", "t.qcow2"], "qimg: img.qcow2: --qmp-timeout applies only with --qmp"),
            (["--qmp-timeout", "5", "--nbd", "nbd+unix:///x?socket=n.sock", "t.qcow2"], "qimg: nbd+unix:///x?socket=n.sock: --qmp-timeout applies only with --qmp"),
            (["--qmp", "q.sock", "--node", "a", "--qmp-timeout", "0", "t.qcow2"], "qimg: q.sock: --qmp-timeout takes a positive number of seconds"),
            (["--qmp", "q.sock", "--node", "a", "--qmp-timeout", "nan", "t.qcow2"], "qimg: q.sock: --qmp-timeout takes a positive number of seconds"),
        ]
        for (args, start) in cases {
            let r = try Qimg.run(["backup"] + args, cwd: dir)
            #expect(r.status == 1 && r.stderrLines.count == 1 && r.err.hasPrefix(start), "\(args): \(r.summary): \(r.err)")
            #expect(try FileManager.default.contentsOfDirectory(atPath: dir) == [], "\(args)")
        }
    }

    /// Runs a live backup with `args` and shuts the VM down (`quit`) while its job runs: the
    /// run fails with 10 and QEMU stores the hold bitmap (named from `hold` on) in disk.qcow2.
    func shutDownDuring(_ vm: LiveVM, _ args: [String], hold: String, _ dir: String) throws {
        let run = try qimg(args, dir)
        #expect(try vm.waitForRunningJob(run))
        try vm.quit()
        run.wait(timeout: 600)
        #expect(run.status == 10, "\(run.summary): \(run.err)")
        let info = try Runner.qemuImg(["info", "disk.qcow2"], cwd: dir)
        #expect(info.out.contains(hold), "QEMU stored the hold bitmap: \(info.out)")
    }

    /// The VM shuts down in the middle of a live run: QEMU stores the hold bitmap with the
    /// image, so the next (offline) run must not trust the job bitmap alone: it takes a full
    /// backup, which restores, and the hold bitmap is gone after it.
    @Test func aVMShutDownMidRunMakesTheNextOfflineRunFull() throws {
        let dir = try Paths.newScratch("live-shutdown")
        try makeDisk(dir)
        let vm = try LiveVM(dir: dir, image: "disk.qcow2", readRate: 2 << 20)
        try finishedRun(qimg(["--qmp", vm.qmpSocket, "--node", "disk0", "--name", "vm", "--repo", "R", "--bitmap", "daily", "--time", "2026-12-01T02:00:00Z"], dir))
        try vm.write(0x41, 30 << 20, 4 << 20)
        try shutDownDuring(vm, ["--qmp", vm.qmpSocket, "--node", "disk0", "--name", "vm", "--repo", "R", "--bitmap", "daily", "--time", "2026-12-02T02:00:00Z"],
                           hold: "qimg-hold:daily@", dir)
        let r = try Qimg.run(["backup", "--repo", "R", "--bitmap", "daily", "--name", "vm", "--time", "2026-12-03T02:00:00Z", "disk.qcow2"], cwd: dir)
        #expect(r.status == 0, "\(r.summary): \(r.err)")
        let p = try #require(try points(dir)["vm"])
        #expect(p.map(\.0) == ["full", "full"], "\(p)")
        if let last = p.last {
            #expect(try compare(["-f", "qcow2", "-F", "qcow2", "disk.qcow2", "R/" + last.1], dir).status == 0)
        }
        #expect(!(try Runner.qemuImg(["info", "disk.qcow2"], cwd: dir).out.contains("qimg-hold:")))
    }

    /// The VM shuts down in the middle of a live incremental: QEMU stores `qimg-hold:bm0`
    /// (the bits the job had not made durable) beside bm0, which records only what came
    /// after. A plain offline incremental copies bm0 ∪ the hold: a run that fails (no space
    /// injected into its target) keeps both bitmaps as they were; the next one restores to
    /// the disk, clears bm0 and only then removes the hold; `bitmap --dump` shows both as
    /// QEMU stored them until then.
    @Test func anOfflineIncrementalCopiesTheHoldBitmapAShutDownLeft() throws {
        let dir = try Paths.newScratch("live-hold-offline")
        let vm = try vmWithDirtyBitmap(dir, dirty: 4 << 20, readRate: 2 << 20)
        try shutDownDuring(vm, incremental(vm, "lost.qcow2"), hold: "qimg-hold:bm0", dir)
        // Written while the VM is down: recorded in bm0 only.
        #expect(try Runner.qemuIO(["-f", "qcow2", "disk.qcow2", "-c", "write -P 0x66 40M 64k"], cwd: dir).status == 0)
        let hold = try BackupTests.dump("disk.qcow2", "qimg-hold:bm0", dir), own = try BackupTests.dump("disk.qcow2", "bm0", dir)
        #expect(hold.dirty == 4 << 20 && own.dirty == 64 << 10, "hold \(hold.dirty), bm0 \(own.dirty)")
        let inc = ["backup", "-q", "--sync=incremental", "--bitmap", "bm0", "-b", "full.qcow2", "-F", "qcow2", "disk.qcow2", "inc.qcow2"]

        let failed = try Runner.run("/usr/bin/env", ["QIMG_FAULTS=write:3:ENOSPC:sticky,prefix:inc.qcow2", Qimg.path] + inc, cwd: dir)
        #expect(failed.exitedNormally && failed.status != 0 && failed.stderrLines.count == 1, "\(failed.summary): \(failed.err)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/inc.qcow2"))
        #expect(try noTemporaries(dir))
        #expect(try BackupTests.dump("disk.qcow2", "qimg-hold:bm0", dir).text == hold.text, "a failed run keeps the hold")
        #expect(try BackupTests.dump("disk.qcow2", "bm0", dir).text == own.text, "a failed run keeps bm0")

        let r = try Qimg.run(inc, cwd: dir)
        #expect(r.status == 0, "\(r.summary): \(r.err)")
        try expectCheckClean("inc.qcow2", dir, "inc")
        try expectCheckClean("disk.qcow2", dir, "disk")
        #expect(try compare(["-f", "qcow2", "-F", "qcow2", "disk.qcow2", "inc.qcow2"], dir).status == 0, "the restore equals the disk")
        #expect(try dataExtents("inc.qcow2", dir) == [[20 << 20, 4 << 20], [40 << 20, 64 << 10]])
        #expect(try BackupTests.dump("disk.qcow2", "bm0", dir).dirty == 0)
        #expect(!(try Runner.qemuImg(["info", "disk.qcow2"], cwd: dir).out.contains("qimg-hold:")), "the hold is removed once bm0 is cleared")
    }
}
