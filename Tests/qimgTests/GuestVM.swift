import Foundation
import QCow2
import Testing
import TestSupport

/// The boot files of a real guest for `--freeze`: Debian's kernel and an initramfs built
/// once per test process from the host's packages (busybox-static, qemu-guest-agent and
/// the shared libraries `ldd` lists for it, the kernel's virtio and ext4 modules in
/// modules.dep order) with an /init that keeps written data in the page cache
/// (vm.dirty_writeback_centisecs=0, a long dirty_expire_centisecs), mounts /dev/vda (ext4)
/// at /mnt and runs qemu-ga on the first virtio-serial port.
enum GuestBoot {
    struct Files {
        let kernel: String
        let initrd: String
    }

    static let busybox = Env.which("busybox") ?? existing("/bin/busybox")
    static let qemuGA = Env.which("qemu-ga") ?? existing("/usr/sbin/qemu-ga")
    static let qemuSystem = Env.which("qemu-system-x86_64")
    static let kernel: String? = {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/boot")) ?? []
        return names.filter { $0.hasPrefix("vmlinuz-") }.sorted().last.map { "/boot/" + $0 }
    }()
    static var available: Bool { busybox != nil && qemuGA != nil && qemuSystem != nil && kernel != nil && sbin("debugfs") != nil }

    /// A system tool that may live in an sbin directory the PATH leaves out.
    static func sbin(_ name: String) -> String? { Env.which(name) ?? existing("/usr/sbin/" + name) ?? existing("/sbin/" + name) }
    static func existing(_ path: String) -> String? { FileManager.default.isExecutableFile(atPath: path) ? path : nil }

    /// The modules the guest loads (with their dependencies), unless built in.
    static let modules = ["virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4"]

    private static let built = Result { try build() }
    static func files() throws -> Files { try built.get() }

    private static func build() throws -> Files {
        guard let kernel, let busybox, let qemuGA else {
            throw TestFailure("a guest needs /boot/vmlinuz-*, busybox and qemu-ga (install linux-image-amd64 busybox-static qemu-guest-agent: make deps)")
        }
        let version = String(kernel.dropFirst("/boot/vmlinuz-".count))
        let dir = Paths.work + "/guest"
        let root = dir + "/root"
        let fm = FileManager.default
        try? fm.removeItem(atPath: dir)
        for d in ["bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "mnt", "run", "var/run", "tmp", "lib/modules"] {
            try fm.createDirectory(atPath: root + "/" + d, withIntermediateDirectories: true)
        }
        try copy(busybox, to: root + "/bin/busybox")
        try copy(qemuGA, to: root + "/usr/sbin/qemu-ga")
        for lib in try sharedLibraries(qemuGA) { try copy(lib, to: root + lib) }
        let loaded = try moduleFiles(version)
        for (name, file) in loaded { try copy(file, to: root + "/lib/modules/\(name).ko") }
        let initScript = root + "/init"
        try initText(modules: loaded.map(\.0)).write(toFile: initScript, atomically: true, encoding: .utf8)
        chmod(initScript, 0o755)
        let cpio = try Runner.run("/bin/sh", ["-c", "find . | '\(busybox)' cpio -o -H newc > ../initrd.cpio"], cwd: root)
        guard cpio.status == 0 else { throw TestFailure("building the initramfs: \(cpio.summary): \(cpio.err)") }
        return Files(kernel: kernel, initrd: dir + "/initrd.cpio")
    }

    private static func copy(_ from: String, to: String) throws {
        try FileManager.default.createDirectory(atPath: (to as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        let compressed = from.hasSuffix(".xz") ? "xz" : from.hasSuffix(".zst") ? "zstd" : nil
        let command = compressed.map { "\($0) -dc '\(from)' > '\(to)'" } ?? "cp -L '\(from)' '\(to)'"
        let r = try Runner.run("/bin/sh", ["-c", command])
        guard r.status == 0 else { throw TestFailure("\(r.summary): \(r.err)") }
    }

    /// The libraries (and the loader) `ldd` lists for `binary`, as absolute paths.
    private static func sharedLibraries(_ binary: String) throws -> [String] {
        let r = try Runner.run("/bin/sh", ["-c", "ldd '\(binary)'"])
        guard r.status == 0 else { throw TestFailure("\(r.summary): \(r.err)") }
        return r.out.split(separator: "\n").compactMap { line in
            let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            if let arrow = words.firstIndex(of: "=>"), arrow + 1 < words.count, words[arrow + 1].hasPrefix("/") { return String(words[arrow + 1]) }
            return words.first.flatMap { $0.hasPrefix("/") ? String($0) : nil }
        }
    }

    /// `modules` and their dependencies (modules.dep), dependencies first, leaving out
    /// those built into the kernel (modules.builtin): (name, file).
    private static func moduleFiles(_ version: String) throws -> [(String, String)] {
        let base = "/lib/modules/\(version)/"
        func name(_ path: Substring) -> String {
            var n = String(path.split(separator: "/").last ?? "")
            for suffix in [".xz", ".zst", ".gz", ".ko"] where n.hasSuffix(suffix) { n.removeLast(suffix.count) }
            return n.replacingOccurrences(of: "-", with: "_")
        }
        let builtin = Set(((try? String(contentsOfFile: base + "modules.builtin", encoding: .utf8)) ?? "").split(separator: "\n").map(name))
        var deps: [String: (String, [String])] = [:]
        for line in try String(contentsOfFile: base + "modules.dep", encoding: .utf8).split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 1)
            guard let file = parts.first else { continue }
            let needs = parts.count > 1 ? parts[1].split(separator: " ").map(name) : []
            deps[name(file)] = (base + file, needs)
        }
        var order: [(String, String)] = []
        func visit(_ m: String) throws {
            if builtin.contains(m) || order.contains(where: { $0.0 == m }) { return }
            guard let (file, needs) = deps[m] else { throw TestFailure("kernel module \(m) is neither in modules.dep nor built in") }
            for d in needs { try visit(d) }
            order.append((m, file))
        }
        for m in modules { try visit(m) }
        return order
    }

    private static func initText(modules: [String]) -> String {
        """
        #!/bin/busybox sh
        /bin/busybox --install -s
        export PATH=/bin:/sbin:/usr/bin:/usr/sbin
        mount -t proc proc /proc
        mount -t sysfs sysfs /sys
        mount -t devtmpfs devtmpfs /dev
        exec </dev/console >/dev/console 2>&1
        for m in \(modules.joined(separator: " ")); do insmod /lib/modules/$m.ko || echo "guest: insmod $m failed"; done
        # Written data stays in the page cache until something flushes it.
        echo 0 > /proc/sys/vm/dirty_writeback_centisecs
        echo 8640000 > /proc/sys/vm/dirty_expire_centisecs
        i=0; while [ ! -b /dev/vda ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done
        mount -t ext4 /dev/vda /mnt || echo "guest: cannot mount /dev/vda"
        i=0; while ! ls /dev/vport*p1 >/dev/null 2>&1 && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done
        echo "guest: ready"
        while true; do
            qemu-ga -m virtio-serial -p $(ls /dev/vport*p1 | head -n 1)
            echo "guest: qemu-ga exited"; sleep 1
        done

        """
    }
}

/// A running guest: qemu-system-x86_64 (q35, TCG, 256 MiB) booting `GuestBoot`'s files, with
/// a 64 MiB ext4 disk (node `disk0`, virtio-blk), two QMP monitors (`qmp.sock` for qimg,
/// `mon.sock` for the test), the agent's channel (`qga.sock`) and a second channel no agent
/// listens on in the guest (`silent.sock`).
final class GuestVM {
    let dir: String
    let qemu: Spawned
    let monitor: QMPConnection
    var qmpSocket: String { dir + "/qmp.sock" }
    var agentSocket: String { dir + "/qga.sock" }
    var silentSocket: String { dir + "/silent.sock" }
    var console: String { (try? String(contentsOfFile: dir + "/console.log", encoding: .utf8)) ?? "" }

    init(dir: String) throws {
        let boot = try GuestBoot.files()
        guard let qemuSystem = GuestBoot.qemuSystem, let mkfs = GuestBoot.sbin("mkfs.ext4") else {
            throw TestFailure("qemu-system-x86_64 and mkfs.ext4 are needed (qemu-system-x86, e2fsprogs)")
        }
        self.dir = dir
        #expect(try Runner.qemuImg(["create", "-q", "-f", "raw", "disk.raw", "64M"], cwd: dir).status == 0)
        let mk = try Runner.run(mkfs, ["-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", "disk.raw"], cwd: dir)
        #expect(mk.status == 0, "\(mk.summary): \(mk.err)")
        #expect(try Runner.qemuImg(["convert", "-f", "raw", "-O", "qcow2", "disk.raw", "disk.qcow2"], cwd: dir).status == 0)
        unlink(dir + "/disk.raw")
        qemu = try Spawned(qemuSystem, [
            "-machine", "q35", "-accel", "tcg", "-m", "256", "-smp", "1", "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", "file:\(dir)/console.log",
            "-kernel", boot.kernel, "-initrd", boot.initrd, "-append", "console=ttyS0 quiet panic=-1",
            "-blockdev", "driver=file,node-name=file0,filename=\(dir)/disk.qcow2",
            "-blockdev", "driver=qcow2,node-name=disk0,file=file0",
            "-device", "virtio-blk-pci,drive=disk0,id=vd0",
            "-qmp", "unix:\(dir)/qmp.sock,server=on,wait=off",
            "-qmp", "unix:\(dir)/mon.sock,server=on,wait=off",
            "-chardev", "socket,path=\(dir)/qga.sock,server=on,wait=off,id=qga0",
            "-chardev", "socket,path=\(dir)/silent.sock,server=on,wait=off,id=qga1",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", "virtserialport,bus=vser0.0,nr=1,chardev=qga0,name=org.qemu.guest_agent.0",
            "-device", "virtserialport,bus=vser0.0,nr=2,chardev=qga1,name=org.qemu.guest_agent.1",
        ], cwd: dir)
        monitor = try LiveVM.connect(dir + "/mon.sock", of: qemu)
        try waitForAgent()
    }

    deinit { stop() }

    func stop() {
        monitor.close()
        qemu.send(SIGKILL)
        qemu.wait(timeout: 60)
    }

    /// Polls the agent (sync + guest-ping) until the guest has booted: a generous
    /// deadline that only a broken setup reaches.
    private func waitForAgent() throws {
        let deadline = Date().addingTimeInterval(300)
        while true {
            guard qemu.isRunning else { throw TestFailure("QEMU exited: \(qemu.err)\nconsole:\n\(console)") }
            if let agent = try? GuestAgent(socket: agentSocket, syncTimeout: 2_000), (try? agent.execute("guest-ping", timeout: 10_000)) != nil {
                return
            }
            guard Date() < deadline else { throw TestFailure("the guest's agent did not answer within 300 s\nconsole:\n\(console)") }
            usleep(200_000)
        }
    }

    func agent() throws -> GuestAgent { try GuestAgent(socket: agentSocket) }

    /// `guest-fsfreeze-status`, through a session of its own.
    func freezeStatus() throws -> String {
        let a = try agent()
        defer { a.close() }
        guard case .string(let s) = try a.execute("guest-fsfreeze-status", timeout: 60_000) else { throw TestFailure("status is not a string") }
        return s
    }

    /// Runs `script` with the guest's /bin/sh (guest-exec) and returns its exit code.
    @discardableResult
    func shell(_ script: String) throws -> UInt64 {
        let a = try agent()
        defer { a.close() }
        let started = try a.execute("guest-exec", [("path", .string("/bin/sh")), ("arg", .array([.string("-c"), .string(script)]))], timeout: 60_000)
        guard let pid = started["pid"] else { throw TestFailure("guest-exec: no pid in \(started)") }
        while true {
            let s = try a.execute("guest-exec-status", [("pid", pid)], timeout: 60_000)
            if s["exited"] == .bool(true) { return s["exitcode"]?.uint64 ?? 255 }
            usleep(50_000)
        }
    }

    func qimgLeftovers() throws -> [String] { try LiveVM.qimgLeftovers(monitor) }
}

/// What a backup holds, read with e2fsprogs from a raw copy made by qemu-img.
enum GuestDisk {
    /// `image` (qcow2, with its backing chain) converted to raw in `dir`: its path.
    static func raw(_ image: String, _ dir: String, extra: [String] = []) throws -> String {
        let out = dir + "/" + (image as NSString).lastPathComponent + ".raw"
        let r = try Runner.qemuImg(["convert"] + extra + ["-O", "raw", image, out], cwd: dir)
        guard r.status == 0 else { throw TestFailure("\(r.summary): \(r.err)") }
        return out
    }

    /// debugfs's `cat FILE` of the raw image (empty when the file is not there).
    static func cat(_ file: String, in raw: String, _ dir: String) throws -> String {
        guard let debugfs = GuestBoot.sbin("debugfs") else { throw TestFailure("debugfs not found (e2fsprogs)") }
        return try Runner.run(debugfs, ["-R", "cat \(file)", raw], cwd: dir).out
    }

    /// `e2fsck -fn` of the raw image.
    static func fsck(_ raw: String, _ dir: String) throws -> RunResult {
        guard let e2fsck = GuestBoot.sbin("e2fsck") else { throw TestFailure("e2fsck not found (e2fsprogs)") }
        return try Runner.run(e2fsck, ["-fn", raw], cwd: dir)
    }
}
