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
    var nbd: String { "nbd+unix:///disk0?socket=\(dir)/nbd.sock" }

    /// Starts QSD on `image` (in `dir`) reading at most `readRate` bytes/s from the file.
    init(dir: String, image: String, readRate: Int = 4 << 20) throws {
        guard let qsd = Env.qemuStorageDaemon else { throw TestFailure("qemu-storage-daemon not found on PATH (install qemu-system-common)") }
        self.dir = dir
        daemon = try Spawned(qsd, [
            "--object", "throttle-group,id=tg0,x-bps-read=\(readRate)",
            "--blockdev", "driver=file,node-name=file0,filename=\(dir)/\(image)",
            "--blockdev", "driver=throttle,node-name=thr0,throttle-group=tg0,file=file0",
            "--blockdev", "driver=qcow2,node-name=disk0,file=thr0",
            "--chardev", "socket,path=\(dir)/qmp.sock,server=on,wait=off,id=m0", "--monitor", "chardev=m0",
            "--chardev", "socket,path=\(dir)/mon.sock,server=on,wait=off,id=m1", "--monitor", "chardev=m1",
            "--nbd-server", "addr.type=unix,addr.path=\(dir)/nbd.sock",
        ], cwd: dir)
        var connected: QMPConnection?
        // The sockets exist once QSD is listening: poll until the monitor answers.
        while connected == nil {
            if !daemon.isRunning { throw TestFailure("qemu-storage-daemon exited: \(daemon.err)") }
            connected = try? QMPConnection(socket: dir + "/mon.sock")
            if connected == nil { usleep(5_000) }
        }
        monitor = connected!
        try monitor.execute("block-export-add", [("type", .string("nbd")), ("id", .string("exp0")), ("node-name", .string("disk0")),
                                                 ("name", .string("disk0")), ("writable", .bool(true))])
    }

    deinit { stop() }

    func stop() {
        monitor.close()
        daemon.send(SIGKILL)
        daemon.wait(timeout: 60)
    }

    /// A guest write through the NBD export.
    func write(_ pattern: Int, _ offset: Int, _ length: Int) throws {
        let r = try Runner.qemuIO(["-f", "raw", nbd, "-c", "write -P \(pattern) \(offset) \(length)"], cwd: dir)
        #expect(r.status == 0, "\(r.summary)")
    }

    func bitmap(_ name: String) throws -> LiveBitmap? { try LiveNodes.find("disk0", monitor).bitmap(name) }

    /// Names of qimg's jobs, nodes and bitmaps present in QEMU.
    func qimgLeftovers() throws -> [String] {
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
            if case .array(let jobs) = try monitor.execute("query-jobs"),
               jobs.contains(where: { if case .string(let id)? = $0["id"], id.hasPrefix("qimg-"), $0["status"] == .string("running") { return true }; return false }) {
                return true
            }
            usleep(2_000)
        }
        return false
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
        try vm.write(0x22, 1 << 20, 64 << 10)       // inside the data being copied
        try vm.write(0x33, 10 << 20, 128 << 10)     // where the disk had nothing
        let stillRunning = try vm.qimgLeftovers().contains { $0.hasPrefix("qimg-backup-") }
        #expect(stillRunning, "the writes must land while the job runs")
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
}
