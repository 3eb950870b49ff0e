import Foundation
import QCow2
import Testing
import TestSupport

/// `qimg backup --qmp SOCKET --node NODE --nbd URI TARGET`: a pull backup whose
/// point-in-time view qimg sets up in a running qemu-storage-daemon (`LiveVM`: guest
/// writes through its writable NBD export `disk0`, reads throttled so that they land while
/// the copy runs), reads over NBD and tears down. Checked with QEMU's tools: `qemu-img
/// compare` against a copy taken before the backup started, `qemu-img map`, `check`.
@Suite(.serialized, .requiresStorageDaemon) struct FleecePullTests {
    let live = LiveBackupTests()

    func pull(_ vm: LiveVM, _ args: [String]) -> [String] {
        ["--qmp", vm.qmpSocket, "--node", "disk0", "--nbd", "nbd+unix:///?socket=\(vm.dir)/nbd.sock"] + args
    }

    /// qimg's exports present in QEMU (asked through the test's monitor).
    func qimgExports(_ monitor: QMPConnection) throws -> [String] {
        guard case .array(let list) = try monitor.execute("query-block-exports") else { return [] }
        return list.compactMap { if case .string(let id)? = $0["id"], id.hasPrefix("qimg-") { return id }; return nil }
    }

    /// Waits until qimg's view is exported (true) or `run` exits first (false).
    func waitForView(_ monitor: QMPConnection, _ run: Spawned) throws -> Bool {
        while run.isRunning {
            if !(try qimgExports(monitor).isEmpty) { return true }
            usleep(2_000)
        }
        return false
    }

    /// A scratch directory with `makeDisk`'s disk, running in a qemu-storage-daemon.
    func runningDisk(_ name: String, readRate: Int = 4 << 20) throws -> (String, LiveVM) {
        let dir = try Paths.newScratch(name)
        try live.makeDisk(dir)
        return (dir, try LiveVM(dir: dir, image: "disk.qcow2", readRate: readRate))
    }

    /// A full pull into full.qcow2 adding bm0, then `dirty` bytes written at 20 MiB (0x44).
    func fullThenDirty(_ vm: LiveVM, _ dir: String, dirty: Int) throws {
        let full = try Qimg.run(["backup"] + pull(vm, ["--bitmap", "bm0", "full.qcow2"]), cwd: dir, timeout: 600)
        #expect(full.status == 0, "\(full.summary): \(full.err)")
        try vm.write(0x44, 20 << 20, dirty)
    }

    func leftovers(_ vm: LiveVM) throws -> [String] {
        try vm.qimgLeftovers() + qimgExports(vm.monitor) + FileManager.default.contentsOfDirectory(atPath: vm.dir).filter { $0.contains("qimg") }
    }

    @Test func writesDuringThePullAreNotInItAndTheNextIncrementalCarriesThem() throws {
        let (dir, vm) = try runningDisk("fleece", readRate: 3 << 20)
        defer { vm.stop() }
        let full = try live.qimg(pull(vm, ["--bitmap", "bm0", "full.qcow2"]), dir)
        #expect(try waitForView(vm.monitor, full), "the backup ended before the guest wrote: \(full.err)")
        // qimg is stopped while the guest writes, so that the writes land while its view is
        // exported whatever the machine's load (no race with the copy's speed).
        full.send(SIGSTOP)
        try vm.write(0x22, 1 << 20, 64 << 10)       // inside the data being copied
        try vm.write(0x33, 10 << 20, 128 << 10)     // where the disk had nothing
        #expect(full.isRunning, "the writes must land while the copy runs")
        full.send(SIGCONT)
        full.wait(timeout: 600)
        #expect(full.status == 0 && !full.signaled, "\(full.summary): \(full.err)")
        try expectCheckClean("full.qcow2", dir, "full")
        let atStart = try live.compare(["-f", "qcow2", "-F", "qcow2", "start.qcow2", "full.qcow2"], dir)
        #expect(atStart.status == 0, "the full backup is the disk as it was at the start: \(atStart.out)")
        #expect(try vm.bitmap("bm0")?.count == 192 << 10, "bm0 holds exactly the writes made during the backup")
        #expect(try leftovers(vm) == [])

        let inc = try live.qimg(pull(vm, ["--sync=incremental", "--bitmap", "bm0", "-b", "full.qcow2", "-F", "qcow2", "inc1.qcow2"]), dir)
        #expect(try waitForView(vm.monitor, inc), "\(inc.err)")
        inc.send(SIGSTOP)
        try vm.write(0x44, 20 << 20, 64 << 10)      // during the incremental: for the next one
        inc.send(SIGCONT)
        inc.wait(timeout: 600)
        #expect(inc.status == 0 && !inc.signaled, "\(inc.summary): \(inc.err)")
        try expectCheckClean("inc1.qcow2", dir, "inc1")
        #expect(try live.dataExtents("inc1.qcow2", dir) == [[1 << 20, 64 << 10], [10 << 20, 128 << 10]])
        #expect(try vm.bitmap("bm0")?.count == 64 << 10)

        let inc2 = try Qimg.run(["backup"] + pull(vm, ["--sync=incremental", "--bitmap", "bm0", "-b", "inc1.qcow2", "-F", "qcow2", "inc2.qcow2"]), cwd: dir, timeout: 600)
        #expect(inc2.status == 0, "\(inc2.summary): \(inc2.err)")
        #expect(try live.dataExtents("inc2.qcow2", dir) == [[20 << 20, 64 << 10]])
        let same = try live.compare(["-f", "raw", "-F", "qcow2", vm.nbd, "inc2.qcow2"], dir)
        #expect(same.status == 0, "restore point inc2 equals the disk: \(same.out) \(same.err)")
        #expect(try leftovers(vm) == [])
    }

    @Test func killedPullsLoseNoBitAndTheNextRunCleansUp() throws {
        let (dir, vm) = try runningDisk("fleece-kill", readRate: 8 << 20)
        defer { vm.stop() }
        try fullThenDirty(vm, dir, dirty: 1 << 20)
        var rng = SeededRNG(state: 0xf1ee_ce15)
        var pending: [[Int]] = [[20 << 20, 1 << 20]]
        var killedMidCopy = 0
        var base = "full.qcow2"
        for i in 0..<12 {
            let at = (24 << 20) + i * (256 << 10)
            try vm.write(0x60 + i % 16, at, 64 << 10)
            pending.append([at, 64 << 10])
            let run = try live.qimg(pull(vm, ["--sync=incremental", "--bitmap", "bm0", "-b", base, "-F", "qcow2", "inc.qcow2"]), dir)
            if i % 2 == 0 {
                if try waitForView(vm.monitor, run) { killedMidCopy += 1 }
            } else {
                usleep(UInt32.random(in: 0...300_000, using: &rng))
            }
            run.send(SIGKILL)
            run.wait(timeout: 600)
            #expect(try vm.monitor.execute("query-jobs") != .null, "QEMU answers after kill \(i)")
            if FileManager.default.fileExists(atPath: dir + "/inc.qcow2") {
                // The run got as far as the rename: a complete point, the next one builds on it.
                try expectCheckClean("inc.qcow2", dir, "kill \(i)")
                base = "p\(i).qcow2"
                try FileManager.default.moveItem(atPath: dir + "/inc.qcow2", toPath: dir + "/" + base)
                pending = []
            }
            // A push run that reads the bitmap without clearing it cleans up first.
            let check = try Qimg.run(["backup", "--qmp", vm.qmpSocket, "--node", "disk0", "--sync=bitmap", "--bitmap", "bm0",
                                      "--bitmap-mode", "never", "--no-backing", "check.qcow2"], cwd: dir, timeout: 600)
            #expect(check.status == 0, "after kill \(i): \(check.summary): \(check.err)")
            let found = try live.dataExtents("check.qcow2", dir)
            for p in pending {
                #expect(found.contains { $0[0] <= p[0] && p[0] + p[1] <= $0[0] + $0[1] }, "after kill \(i): the bitmap lost \(p)")
            }
            try FileManager.default.removeItem(atPath: dir + "/check.qcow2")
            #expect(try leftovers(vm) == [], "after kill \(i)")
        }
        #expect(killedMidCopy >= 6, "kills that landed while the view was exported: \(killedMidCopy)")
        // After the kills a pull completes and carries every pending write.
        let inc = try Qimg.run(["backup"] + pull(vm, ["--sync=incremental", "--bitmap", "bm0", "-b", base, "-F", "qcow2", "inc.qcow2"]), cwd: dir, timeout: 600)
        #expect(inc.status == 0, "\(inc.summary): \(inc.err)")
        try expectCheckClean("inc.qcow2", dir, "final")
        let same = try live.compare(["-f", "raw", "-F", "qcow2", vm.nbd, "inc.qcow2"], dir)
        #expect(same.status == 0, "the last point equals the disk: \(same.out) \(same.err)")
        #expect(try leftovers(vm) == [])
    }

    /// With no NBD server running, qimg starts one where the URI says and stops it again.
    @Test func qimgStartsTheServerItNeedsAndStopsIt() throws {
        let (dir, vm) = try runningDisk("fleece-server")
        defer { vm.stop() }
        try vm.monitor.execute("nbd-server-stop")
        let r = try Qimg.run(["backup", "--qmp", vm.qmpSocket, "--node", "disk0", "--nbd", "nbd+unix:///?socket=\(dir)/own.sock", "full.qcow2"], cwd: dir, timeout: 600)
        #expect(r.status == 0, "\(r.summary): \(r.err)")
        #expect(try live.compare(["-f", "qcow2", "-F", "qcow2", "start.qcow2", "full.qcow2"], dir).status == 0)
        try expectCheckClean("full.qcow2", dir, "full")
        // QEMU runs one NBD server: starting another succeeds only if qimg stopped its own.
        let again = try vm.monitor.tryExecute("nbd-server-start", [("addr", .object([("type", .string("unix")), ("data", .object([("path", .string(dir + "/again.sock"))]))]))])
        if case .failure(let e) = again { Issue.record("qimg left its NBD server running: \(e.description)") }
        #expect(try leftovers(vm) == [])
    }

    /// Refusals and a failed pull: one line, non-zero exit, no TARGET, nothing left in QEMU,
    /// and bm0 with exactly the bits it had.
    @Test func failuresLeaveTheBitmapAndQEMUAsTheyWere() throws {
        let (dir, vm) = try runningDisk("fleece-fail")
        defer { vm.stop() }
        try fullThenDirty(vm, dir, dirty: 1 << 20)
        let before = try live.sha(vm, "bm0")
        let inc = ["--sync=incremental", "--bitmap", "bm0", "-b", "full.qcow2", "-F", "qcow2", "inc.qcow2"]
        let cases: [(String, [String])] = [
            ("no such node", ["--qmp", vm.qmpSocket, "--node", "nope", "--nbd", "nbd+unix:///?socket=\(dir)/nbd.sock"] + inc),
            ("no such bitmap", pull(vm, ["--sync=incremental", "--bitmap", "bmX", "-b", "full.qcow2", "-F", "qcow2", "inc.qcow2"])),
            // QEMU serves NBD elsewhere: the view is set up, the pull cannot connect, all is undone.
            ("wrong server address", ["--qmp", vm.qmpSocket, "--node", "disk0", "--nbd", "nbd+unix:///?socket=\(dir)/other.sock"] + inc),
            ("not a server URI", ["--qmp", vm.qmpSocket, "--node", "disk0", "--nbd", "http://x/"] + inc),
        ]
        for (label, args) in cases {
            let r = try Qimg.run(["backup"] + args, cwd: dir, timeout: 600)
            expectCleanFailure(label, r)
            #expect(!FileManager.default.fileExists(atPath: dir + "/inc.qcow2"), "\(label): a target was left")
            #expect(try live.sha(vm, "bm0") == before, "\(label): bm0 changed")
            #expect(try leftovers(vm) == [], "\(label)")
        }
    }

    /// SIGTERM mid-copy: the view is torn down and bm0 keeps its bits plus the writes since.
    @Test func aSignalTearsTheViewDownAndTheBitmapKeepsItsBits() throws {
        let (dir, vm) = try runningDisk("fleece-signal", readRate: 2 << 20)
        defer { vm.stop() }
        try fullThenDirty(vm, dir, dirty: 4 << 20)
        let before = try #require(try vm.bitmap("bm0")).count
        let run = try live.qimg(pull(vm, ["--sync=incremental", "--bitmap", "bm0", "-b", "full.qcow2", "-F", "qcow2", "inc.qcow2"]), dir)
        #expect(try waitForView(vm.monitor, run), "the backup ended before the signal: \(run.err)")
        try vm.write(0x55, 40 << 20, 128 << 10)
        run.send(SIGTERM)
        run.wait(timeout: 600)
        #expect(run.status == 143 && !run.signaled, "\(run.summary): \(run.err)")
        #expect(run.stderrLines.count == 1, "\(run.err)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/inc.qcow2"))
        #expect(try vm.bitmap("bm0")?.count == before + (128 << 10))
        #expect(try leftovers(vm) == [])
    }

    /// A full target disk under the view qimg set up: exit 5 as in every backup mode, the
    /// view torn down, nothing left on the disk and bm0 with every bit it had.
    @Test func aFullTargetDiskExits5AndKeepsTheBitmap() throws {
        let (dir, vm) = try runningDisk("fleece-enospc")
        defer { vm.stop() }
        try fullThenDirty(vm, dir, dirty: 4 << 20)
        let fs = try SmallFilesystem(at: dir + "/small")
        defer { fs.unmount() }
        let before = try live.sha(vm, "bm0")
        let r = try Qimg.run(["backup"] + pull(vm, ["--sync=incremental", "--bitmap", "bm0", "-b", "../full.qcow2", "-F", "qcow2", "small/inc.qcow2"]),
                             cwd: dir, timeout: 600)
        #expect(r.status == 5 && !r.signaled, "\(r.summary): \(r.err)")
        #expect(r.stderrLines.count == 1 && r.err.contains("No space left on device"), "stderr: \(r.err)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/small") == [])
        #expect(try live.sha(vm, "bm0") == before)
        #expect(try leftovers(vm) == [])
    }

    /// The view ends while qimg copies from it (qimg stopped mid-copy; the test cancels the
    /// view's job through its own monitor, so guest writes would reach the export): qimg
    /// refuses to keep the copy — exit 17, one line, no TARGET nor temporary file, bm0 with
    /// every bit it had, nothing of qimg's left in QEMU.
    @Test func aViewEndedDuringTheCopyIsNotKept() throws {
        let (dir, vm) = try runningDisk("fleece-ended", readRate: 2 << 20)
        defer { vm.stop() }
        try fullThenDirty(vm, dir, dirty: 4 << 20)
        let before = try live.sha(vm, "bm0")
        let run = try live.qimg(pull(vm, ["--sync=incremental", "--bitmap", "bm0", "-b", "full.qcow2", "-F", "qcow2", "inc.qcow2"]), dir)
        #expect(try waitForView(vm.monitor, run), "the backup ended before the view could be ended: \(run.err)")
        run.send(SIGSTOP)
        let job = try #require(try vm.runningJob(), "the view's job")
        try vm.monitor.execute("job-cancel", [("id", .string(job))])
        run.send(SIGCONT)
        run.wait(timeout: 600)
        #expect(run.status == 17 && !run.signaled, "\(run.summary): \(run.err)")
        #expect(run.stderrLines.count == 1 && run.err.contains("ended during the copy"), "\(run.err)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/inc.qcow2"))
        #expect(try live.noTemporaries(dir))
        #expect(try live.sha(vm, "bm0") == before)
        #expect(try leftovers(vm) == [])
    }

    /// The fleecing path against a real qemu-system-x86_64 (-machine none, no guest; the
    /// disk a -drive read through a throttle, named by its drive id, two QMP monitors): guest
    /// writes are HMP `qemu-io` on the test's monitor while qimg is stopped mid-copy. The full equals the
    /// disk as it was at the start, the next incremental holds exactly those writes, and
    /// after a clean quit the image equals that incremental.
    @Test func qemuSystemFleecing() throws {
        guard let qemu = Env.which("qemu-system-x86_64") else {
            if Env.isCI { throw TestFailure("qemu-system-x86_64 is missing (Debian: qemu-system-x86)") }
            print("FleecePullTests.qemuSystemFleecing: qemu-system-x86_64 not installed"); return
        }
        let dir = try Paths.newScratch("fleece-system")
        try live.makeDisk(dir)
        let vm = try Spawned(qemu, ["-machine", "none", "-nodefaults", "-display", "none",
                                    "-qmp", "unix:\(dir)/qmp.sock,server=on,wait=off", "-qmp", "unix:\(dir)/mon.sock,server=on,wait=off",
                                    "-object", "throttle-group,id=tg0,x-bps-read=\(2 << 20)",
                                    // A drive (a named BlockBackend, as a guest device has): QEMU moves it
                                    // above the view's copy-before-write filter, so its writes reach the view.
                                    "-drive", "if=none,id=legacy0,node-name=disk0,driver=qcow2,file.driver=throttle,file.throttle-group=tg0,"
                                        + "file.file.driver=file,file.file.filename=\(dir)/disk.qcow2"], cwd: dir)
        defer { vm.send(SIGKILL); vm.wait(timeout: 600) }
        let m = try LiveVM.connect(dir + "/mon.sock", of: vm)
        func guestWrite(_ command: String) throws {
            let r = try m.execute("human-monitor-command", [("command-line", .string("qemu-io legacy0 \"\(command)\""))])
            #expect(r == .string(""), "qemu-io \(command): \(r)")
        }
        let nbd = ["--qmp", dir + "/qmp.sock", "--node", "legacy0", "--nbd", "nbd+unix:///?socket=\(dir)/nbd.sock"]
        let full = try live.qimg(nbd + ["--bitmap", "bm0", "full.qcow2"], dir)
        #expect(try waitForView(m, full), "the backup ended before the guest wrote: \(full.err)")
        full.send(SIGSTOP)
        try guestWrite("write -P 0x22 1M 64k")
        try guestWrite("write -P 0x33 10M 128k")
        full.send(SIGCONT)
        live.finishedRun(full)
        #expect(try live.compare(["-f", "qcow2", "-F", "qcow2", "start.qcow2", "full.qcow2"], dir).status == 0, "the full is the disk at the start")
        try live.finishedRun(live.qimg(nbd + ["--sync=incremental", "--bitmap", "bm0", "-b", "full.qcow2", "-F", "qcow2", "inc.qcow2"], dir))
        #expect(try live.dataExtents("inc.qcow2", dir) == [[1 << 20, 64 << 10], [10 << 20, 128 << 10]])
        _ = try m.tryExecute("quit")
        vm.wait(timeout: 600)
        for f in ["full.qcow2", "inc.qcow2", "disk.qcow2"] { try expectCheckClean(f, dir, f) }
        #expect(try live.compare(["-f", "qcow2", "-F", "qcow2", "disk.qcow2", "inc.qcow2"], dir).status == 0, "the image equals the incremental")
        #expect(!(try FileManager.default.contentsOfDirectory(atPath: dir).contains { $0.contains("qimg") }))
    }
}
