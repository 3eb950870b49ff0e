import Foundation
import QCow2
import Testing
import TestSupport

extension Trait where Self == ConditionTrait {
    /// A real guest needs qemu-system-x86_64, a kernel, busybox, qemu-ga and e2fsprogs;
    /// with CI=true their absence is a failure.
    static var requiresGuest: Self {
        .enabled(if: (Env.qemuAvailable && GuestBoot.available) || Env.isCI,
                 "SKIPPED: a guest needs qemu-system-x86_64, /boot/vmlinuz-*, busybox, qemu-ga and e2fsprogs (make deps). With CI=true this is a failure.")
    }
}

/// `qimg backup --qmp ... --freeze QGA_SOCKET`: the guest's filesystems frozen through its
/// real agent (qemu-ga in a real Linux guest, `GuestVM`) around the start of the backup.
/// The proof is a file the guest wrote without syncing (`echo ... > /mnt/NAME`): it stays
/// in the guest's page cache, so a backup without --freeze does not hold it, and one with
/// --freeze does (the freeze writes it out), read back with debugfs from the backup, whose
/// filesystem `e2fsck -fn` finds clean.
@Suite(.serialized, .requiresGuest) struct GuestFreezeTests {
    func qimg(_ args: [String], _ dir: String) throws -> RunResult { try Qimg.run(["backup"] + args, cwd: dir, timeout: 600) }

    func push(_ vm: GuestVM, _ args: [String]) -> [String] { ["--qmp", vm.qmpSocket, "--node", "disk0"] + args }

    /// Writes "unflushed-NAME" to /mnt/`name` in the guest, without a sync.
    func write(_ vm: GuestVM, _ name: String) throws {
        #expect(try vm.shell("echo unflushed-\(name) > /mnt/\(name)") == 0)
    }

    /// The guest is thawed and still runs commands.
    func expectThawedAndRunning(_ vm: GuestVM, _ what: String) throws {
        #expect(try vm.freezeStatus() == "thawed", "\(what): the guest is thawed")
        #expect(try vm.shell("true") == 0, "\(what): the guest still runs commands")
    }

    /// The backup `image`'s filesystem: the text of /`name` (empty if absent), and fsck's result.
    func contents(_ image: String, _ name: String, _ dir: String) throws -> (String, RunResult) {
        let raw = try GuestDisk.raw(image, dir)
        defer { unlink(raw) }
        return (try GuestDisk.cat("/" + name, in: raw, dir), try GuestDisk.fsck(raw, dir))
    }

    /// The backup `image` holds /`name` as the guest wrote it (`write`), on a filesystem
    /// `e2fsck -fn` finds clean; the guest is thawed and still runs commands.
    func expectFrozenCopy(_ vm: GuestVM, _ image: String, _ name: String, _ dir: String, _ what: String) throws {
        let (text, fsck) = try contents(image, name, dir)
        #expect(text == "unflushed-\(name)\n", "\(what): the backup holds the write the guest had not flushed")
        #expect(fsck.status == 0, "\(what): e2fsck -fn on the backup: \(fsck.out)")
        try expectThawedAndRunning(vm, what)
    }

    @Test func pushWithFreezeHoldsWhatTheGuestHadNotFlushedAndWithoutItDoesNot() throws {
        let dir = try Paths.newScratch("freeze-push")
        let vm = try GuestVM(dir: dir)
        defer { vm.stop() }
        try write(vm, "a")

        let plain = try qimg(push(vm, ["--sync=full", "plain.qcow2"]), dir)
        #expect(plain.status == 0, "\(plain.summary): \(plain.err)")
        #expect(try !contents("plain.qcow2", "a", dir).0.contains("unflushed-a"),
                "without --freeze the write is still in the guest's page cache (else this test proves nothing)")
        try expectThawedAndRunning(vm, "without --freeze")

        let frozen = try qimg(push(vm, ["--bitmap", "b0", "--freeze", vm.agentSocket, "full.qcow2"]), dir)
        #expect(frozen.status == 0, "\(frozen.summary): \(frozen.err)")
        #expect(frozen.out.contains("1 guest filesystem frozen"), "\(frozen.out)")
        try expectFrozenCopy(vm, "full.qcow2", "a", dir, "full with --freeze")
        try expectCheckClean("full.qcow2", dir, "full")

        try write(vm, "b")
        let inc = try qimg(push(vm, ["--sync=incremental", "--bitmap", "b0", "-b", "full.qcow2", "-F", "qcow2", "--freeze", vm.agentSocket, "inc.qcow2"]), dir)
        #expect(inc.status == 0, "\(inc.summary): \(inc.err)")
        try expectFrozenCopy(vm, "inc.qcow2", "b", dir, "incremental with --freeze")
        #expect(try vm.qimgLeftovers() == [])
    }

    @Test func repositoryAndFleecingRunsFreezeToo() throws {
        let dir = try Paths.newScratch("freeze-repo")
        let vm = try GuestVM(dir: dir)
        defer { vm.stop() }
        let repo = dir + "/repo"
        var files: [String] = []
        for (i, name) in ["r1", "r2"].enumerated() {
            try write(vm, name)
            let r = try qimg(push(vm, ["--repo", repo, "--bitmap", "nightly", "--freeze", vm.agentSocket]), dir)
            #expect(r.status == 0, "\(r.summary): \(r.err)")
            #expect(r.err.contains(i == 0 ? "full" : "incremental") && r.err.contains("1 guest filesystem frozen"), "\(r.err)")
            let points = try FileManager.default.contentsOfDirectory(atPath: repo + "/disk0").filter { $0.hasSuffix(".qcow2") }.sorted()
            files = points.map { repo + "/disk0/" + $0 }
            try expectFrozenCopy(vm, files.last ?? "", name, dir, "repository point \(i + 1)")
        }
        #expect(files.count == 2)

        try write(vm, "f")
        let nbd = "nbd+unix:///?socket=\(dir)/nbd.sock"
        let pull = try qimg(push(vm, ["--nbd", nbd, "--freeze", vm.agentSocket, "pulled.qcow2"]), dir)
        #expect(pull.status == 0, "\(pull.summary): \(pull.err)")
        #expect(pull.out.contains("1 guest filesystem frozen"), "\(pull.out)")
        try expectFrozenCopy(vm, "pulled.qcow2", "f", dir, "pull with --freeze")
        #expect(try vm.qimgLeftovers() == [])
    }

    /// A transaction QEMU refuses after the freeze (its bitmap removed while qimg waited for
    /// the agent's answer to the freeze, held by a relay), and a run qimg refuses before it
    /// (no such bitmap): the guest is thawed, the run fails with its code, no target.
    @Test func aFailingStartThawsTheGuestAndKeepsNothing() throws {
        let dir = try Paths.newScratch("freeze-fail")
        let vm = try GuestVM(dir: dir)
        defer { vm.stop() }
        try vm.monitor.execute("block-dirty-bitmap-add", [("node", .string("disk0")), ("name", .string("b0")), ("persistent", .bool(true))])
        #expect(try Runner.qemuImg(["create", "-q", "-f", "qcow2", "prev.qcow2", "64M"], cwd: dir).status == 0)
        try write(vm, "c")
        let frozen = DispatchSemaphore(value: 0), resume = DispatchSemaphore(value: 0)
        let relay = try AgentRelay(path: dir + "/relay.sock", agent: vm.agentSocket) {
            frozen.signal()
            resume.wait()
            return .pass
        }
        let run = try Spawned(Qimg.path, ["backup"] + push(vm, ["--sync=incremental", "--bitmap", "b0", "-b", "prev.qcow2", "-F", "qcow2",
                                                                 "--freeze", relay.path, "t.qcow2"]), cwd: dir)
        #expect(try waitUntilFrozen(run, frozen))
        try vm.monitor.execute("block-dirty-bitmap-remove", [("node", .string("disk0")), ("name", .string("b0"))])
        resume.signal()
        run.wait(timeout: 600)
        #expect(run.status == 11 && !run.signaled && run.stderrLines.count == 1 && run.err.contains("transaction"), "\(run.summary): \(run.err)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/t.qcow2"))
        try expectThawedAndRunning(vm, "after a refused transaction")
        // The freeze did happen: it wrote the guest's data to the disk.
        let live = try GuestDisk.raw("disk.qcow2", dir, extra: ["-U"])
        #expect(try GuestDisk.cat("/c", in: live, dir) == "unflushed-c\n", "the refused run had frozen (flushed) the guest")

        let missing = try qimg(push(vm, ["--sync=incremental", "--bitmap", "nope", "-b", "prev.qcow2", "-F", "qcow2", "--freeze", vm.agentSocket, "t.qcow2"]), dir)
        #expect(missing.status == 13 && missing.stderrLines.count == 1, "\(missing.summary): \(missing.err)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/t.qcow2"))
        try expectThawedAndRunning(vm, "after a missing bitmap")
        #expect(try vm.qimgLeftovers() == [])

        // The agent's channel lost after the freeze: the thaw fails, the started job is
        // cancelled and nothing kept (exit 19); the guest stays frozen until the next run.
        try vm.monitor.execute("block-dirty-bitmap-add", [("node", .string("disk0")), ("name", .string("b1")), ("persistent", .bool(true))])
        let cut = try AgentRelay(path: dir + "/cut.sock", agent: vm.agentSocket) { .passThenCut }
        let lost = try qimg(push(vm, ["--sync=incremental", "--bitmap", "b1", "-b", "prev.qcow2", "-F", "qcow2", "--freeze", cut.path, "t.qcow2"]), dir)
        #expect(lost.status == 19 && lost.stderrLines.count == 1 && lost.err.contains("may still be frozen"), "\(lost.summary): \(lost.err)")
        #expect(!FileManager.default.fileExists(atPath: dir + "/t.qcow2"))
        #expect(try vm.freezeStatus() == "frozen")
        #expect(try LiveNodes.find("disk0", vm.monitor).bitmap("b1") != nil && vm.qimgLeftovers() == [], "b1 is given back its bits, no job left")
        try expectNextRunThaws(vm, dir, "after-cut.qcow2")
    }

    /// Waits until the relay reports the guest frozen (true), or `run` ends first (false).
    func waitUntilFrozen(_ run: Spawned, _ frozen: DispatchSemaphore) throws -> Bool {
        while run.isRunning {
            if frozen.wait(timeout: .now() + 0.1) == .success { return true }
        }
        return false
    }

    /// No agent: a socket nothing listens on, and a channel whose guest runs no agent. The
    /// run fails (exit 18) before anything is frozen or started.
    @Test func noAgentIsAnErrorBeforeAnythingStarts() throws {
        let dir = try Paths.newScratch("freeze-noagent")
        let vm = try GuestVM(dir: dir)
        defer { vm.stop() }
        let cases: [(String, String)] = [(dir + "/nothing.sock", "cannot connect to the guest agent's socket"),
                                         (vm.silentSocket, "no guest agent answered within 10 s")]
        for (socket, message) in cases {
            let r = try qimg(push(vm, ["--bitmap", "b0", "--freeze", socket, "t.qcow2"]), dir)
            #expect(r.status == 18 && r.stderrLines.count == 1 && r.err.hasPrefix("qimg: \(socket): \(message)"), "\(r.summary): \(r.err)")
            #expect(!FileManager.default.fileExists(atPath: dir + "/t.qcow2"))
            #expect(try LiveNodes.find("disk0", vm.monitor).bitmap("b0") == nil, "nothing was started (no bitmap added)")
            #expect(try vm.qimgLeftovers() == [])
        }
        try expectThawedAndRunning(vm, "after the refusals")
    }

    @Test func freezeNeedsQMP() throws {
        let dir = try Paths.newScratch("freeze-usage")
        for args in [["--freeze", "qga.sock", "img.qcow2", "t.qcow2"], ["--nbd", "nbd+unix:///x?socket=/n.sock", "--freeze", "qga.sock", "t.qcow2"]] {
            let r = try qimg(args, dir)
            #expect(r.status == 1 && r.stderrLines.count == 1 && r.err.contains("--freeze applies only with --qmp"), "\(r.summary): \(r.err)")
        }
    }

    /// A guest frozen by a run that was killed before it thawed: first the state such a
    /// run leaves, made through the agent; then a real qimg killed (SIGKILL) between its
    /// freeze and its thaw, caught by a relay on the agent's socket that holds back the
    /// agent's answer to the freeze. Each time the guest stays frozen, and the next run
    /// with --freeze thaws it first, says so, and succeeds.
    @Test func aGuestLeftFrozenIsThawedFirstByTheNextRun() throws {
        let dir = try Paths.newScratch("freeze-left")
        let vm = try GuestVM(dir: dir)
        defer { vm.stop() }
        let agent = try vm.agent()
        #expect(try agent.execute("guest-fsfreeze-freeze", timeout: 60_000).uint64 == 1)
        agent.close()
        #expect(try vm.freezeStatus() == "frozen")
        try expectNextRunThaws(vm, dir, "full.qcow2")

        let frozen = DispatchSemaphore(value: 0)
        let relay = try AgentRelay(path: dir + "/relay.sock", agent: vm.agentSocket) {
            frozen.signal()
            return .hold
        }
        let run = try Spawned(Qimg.path, ["backup"] + push(vm, ["--sync=full", "--freeze", relay.path, "killed.qcow2"]), cwd: dir)
        let caught = try waitUntilFrozen(run, frozen)
        run.send(SIGKILL)
        run.wait(timeout: 600)
        #expect(caught, "qimg ended before its freeze: \(run.summary): \(run.err)")
        #expect(try vm.freezeStatus() == "frozen", "the killed run left the guest frozen")
        #expect(!FileManager.default.fileExists(atPath: dir + "/killed.qcow2"))
        try expectNextRunThaws(vm, dir, "after-kill.qcow2")
        #expect(try vm.qimgLeftovers() == [])
    }

    func expectNextRunThaws(_ vm: GuestVM, _ dir: String, _ target: String) throws {
        let r = try qimg(push(vm, ["--sync=full", "--freeze", vm.agentSocket, target]), dir)
        #expect(r.status == 0, "\(r.summary): \(r.err)")
        #expect(r.out.contains("thawed 1 guest filesystem an earlier run had left frozen") && r.out.contains("1 guest filesystem frozen"), "\(r.out)")
        try expectCheckClean(target, dir, target)
        try expectThawedAndRunning(vm, "after the run that thawed")
    }
}
