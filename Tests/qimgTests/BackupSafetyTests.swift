// What a new user found unsafe in backup and convert (issue 11): kills while the bitmap
// is cleared, concurrent runs and their temporary files, who holds a lock, signals,
// progress, and refusals of targets the copy is made of.

import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

@Suite struct BackupSafetyTests {
    typealias B = BackupTests

    /// The granules a dump marks.
    static func granules(_ d: (text: String, dirty: UInt64, granularity: UInt64, extents: [[UInt64]])) -> Set<UInt64> {
        var out = Set<UInt64>()
        for e in d.extents { for g in stride(from: e[0] / d.granularity, to: (e[0] + e[1] + d.granularity - 1) / d.granularity, by: 1) { out.insert(g) } }
        return out
    }

    /// SIGKILL at every write and sync qimg makes to the SOURCE of an incremental backup,
    /// i.e. while it clears the bitmap after the target is durable (QIMG_FAULTS kills the
    /// process at the Nth call, after half of a torn write on odd N). Every kill leaves a
    /// source that qemu-img check finds clean — no leaked cluster — with the target
    /// complete and the bitmap a mix of old and cleared bits, never in use; the next
    /// incremental backup on top completes the chain. The bitmap spans 16 data clusters
    /// (4 KiB clusters, 512-byte granularity) so that the clearing is many writes long.
    @Test(.requiresQEMU) func killWhileClearingTheBitmapLeaksNothing() throws {
        let dir = try B.scratch("clear-kill")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "src.qcow2", "256M"], dir)
        try B.tool(["qemu-img", "bitmap", "--add", "-g", "512", "src.qcow2", "b"], dir)
        try B.tool(["qemu-img", "bitmap", "--add", "-g", "4096", "--disable", "src.qcow2", "frozen"], dir)
        try B.tool(["qemu-io", "-c", "write -P 1 0 8M", "src.qcow2"], dir)
        try B.qimg(["backup", "--sync=full", "--bitmap=b", "src.qcow2", "full.qcow2"], dir)
        // One dirty run in each 16 MiB that one bitmap data cluster covers.
        let writes = (0..<16).flatMap { ["-c", "write -P \(0x20 + $0) \($0 * 16 + 3)M 192k"] }
        try B.tool(["qemu-io"] + writes + ["src.qcow2"], dir)
        try FileManager.default.copyItem(atPath: dir + "/src.qcow2", toPath: dir + "/template.qcow2")
        let d0 = try B.dump("src.qcow2", "b", dir), frozen0 = try B.dump("src.qcow2", "frozen", dir)
        #expect(d0.dirty == 16 * 192 * 1024)
        let old = Self.granules(d0)

        var kills = 0
        for kind in ["write", "sync"] {
            var n = 1
            while n < 200 {
                for f in ["src.qcow2", "inc.qcow2", "next.qcow2"] { unlink(dir + "/" + f) }
                try FileManager.default.copyItem(atPath: dir + "/template.qcow2", toPath: dir + "/src.qcow2")
                let spec = "\(kind):\(n):kill\(kind == "write" && n % 2 == 1 ? ":partial" : ""),prefix:src.qcow2"
                let label = "QIMG_FAULTS=\(spec)"
                let r = try Runner.run("/usr/bin/env", ["QIMG_FAULTS=\(spec)", Qimg.path, "backup", "-q", "--sync=incremental", "--bitmap=b",
                                                        "-b", "full.qcow2", "-F", "qcow2", "src.qcow2", "inc.qcow2"], cwd: dir)
                if r.exitedNormally && r.status == 0 { break }  // past the last call: nothing left to kill
                #expect(r.signaled && r.status == SIGKILL, "\(label): \(r.summary): \(r.err)")
                kills += 1
                // The target was durable before the source was touched.
                try B.expectIdentical("src.qcow2", "inc.qcow2", dir, label)
                try expectCheckClean("inc.qcow2", dir, label)
                // No leaked cluster, no corruption.
                try expectCheckClean("src.qcow2", dir, label)
                let info = try B.tool(["qemu-img", "info", "src.qcow2"], dir).out
                #expect(!info.contains("in-use"), "\(label): a bitmap was left in use:\n\(info)")
                let now = Self.granules(try B.dump("src.qcow2", "b", dir))
                #expect(now.isSubset(of: old), "\(label): the bitmap gained bits")
                #expect(try B.dump("src.qcow2", "frozen", dir).text == frozen0.text, "\(label): the disabled bitmap changed")
                // The next incremental copies what is still marked and completes the chain.
                try B.qimg(["backup", "-q", "--sync=incremental", "--bitmap=b", "-b", "inc.qcow2", "-F", "qcow2", "src.qcow2", "next.qcow2"], dir)
                try B.expectIdentical("src.qcow2", "next.qcow2", dir, label + ", next backup")
                #expect(try B.dump("src.qcow2", "b", dir).dirty == 0, "\(label): bits left after the next backup")
                try expectCheckClean("src.qcow2", dir, label + ", next backup")
                n += 1
            }
            #expect(n > 1, "\(kind): no \(kind) to the source was reached (the campaign kills nothing)")
        }
        // 16 data clusters rewritten in place, and the barrier after them.
        #expect(kills >= 17, "only \(kills) kills")
    }

    /// Waits until `cond` holds or `p` exits (no time limit: a loaded machine only makes it slower).
    static func waitUntil(_ p: Spawned, _ cond: () -> Bool) {
        while !cond() && !p.wait(timeout: 0.005) {}
    }

    /// A second run with the same target while the first is copying: it fails on the lock,
    /// names the holder (another qimg, with its pid), and leaves the first run's temporary
    /// file alone, so that the first completes. A later run removes the temporary files of
    /// dead runs, whatever their target, and never those of live ones.
    @Test(.requiresQEMU) func concurrentRunsAndLeftovers() throws {
        let dir = try B.scratch("concurrent")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.makeDirtySource(dir, size: "64M", dirtyMiB: 40)
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "other.qcow2", "16M"], dir)
        // Leftovers of dead runs: this naming, and the one of earlier versions.
        for dead in ["gone.qcow2.4242-deadbeef.qimg-tmp", "old.qcow2.qimg-tmp"] {
            #expect(FileManager.default.createFile(atPath: dir + "/" + dead, contents: Data([1, 2, 3])))
        }
        let first = try Spawned(Qimg.path, ["backup", "--sync=incremental", "--no-backing", "--bitmap=b", "--speed=16M", "src.qcow2", "t.qcow2"], cwd: dir)
        Self.waitUntil(first) { B.hasTemporary(dir, of: "t.qcow2") }
        // Frozen while the others run (SIGSTOP): however loaded the machine, it is still copying.
        first.send(SIGSTOP)
        let tmp = B.temporaryFiles(dir, of: "t.qcow2")
        #expect(tmp.count == 1, "temporary files: \(tmp)")
        #expect(tmp.first?.hasPrefix("t.qcow2.\(first.pid)-") == true, "the name does not carry the run's pid: \(tmp)")

        let second = try Qimg.run(["backup", "--sync=incremental", "--no-backing", "--bitmap=b", "src.qcow2", "t.qcow2"], cwd: dir)
        expectCleanFailure("second run", second)
        #expect(second.err.contains("src.qcow2: image is in use by another qimg (pid \(first.pid))"), "stderr: \(second.err)")
        // A backup of another image into the same directory cleans the dead runs' files only.
        try B.qimg(["backup", "-q", "--sync=full", "other.qcow2", "o.qcow2"], dir)
        #expect(!B.exists(dir, "gone.qcow2.4242-deadbeef.qimg-tmp") && !B.exists(dir, "old.qcow2.qimg-tmp"), "dead runs' files were left")
        #expect(B.temporaryFiles(dir, of: "t.qcow2") == tmp, "the live run's temporary file was touched")

        first.send(SIGCONT)
        first.wait(timeout: Runner.backstopSeconds)
        #expect(!first.signaled && first.status == 0, "first run: \(first.summary): \(first.err)")
        #expect(!B.hasTemporary(dir, of: "t.qcow2"))
        try B.expectIdentical("src.qcow2", "t.qcow2", dir, "first run")
        #expect(try B.dump("src.qcow2", "b", dir).dirty == 0)
    }

    /// A running VM holds the image: the refusal says so, with the program and its pid, and
    /// points to the live modes (--qmp, --nbd).
    @Test(.requiresQEMU) func refusalNamesARunningVM() throws {
        guard let qemu = Env.which("qemu-system-x86_64") else {
            if Env.isCI { throw TestFailure("qemu-system-x86_64 is missing (Debian: qemu-system-x86)") }
            print("BackupSafetyTests.refusalNamesARunningVM: qemu-system-x86_64 not installed"); return
        }
        let dir = try B.scratch("vm")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.makeDirtySource(dir, size: "16M", dirtyMiB: 1)
        let vm = try Spawned(qemu, ["-S", "-display", "none", "-nodefaults", "-machine", "none",
                                    "-blockdev", "driver=qcow2,node-name=disk,file.driver=file,file.filename=src.qcow2"], cwd: dir)
        defer { vm.send(SIGKILL); vm.wait(timeout: Runner.backstopSeconds) }
        // The VM has the image once it holds the write lock (byte 101), asked of the kernel
        // (no probe that could take the lock itself and make the VM fail to start).
        Self.waitUntil(vm) { lockHeld(on: dir + "/src.qcow2", byte: 101) }
        #expect(!vm.exited, "the VM exited: \(vm.summary): \(vm.err)")
        let r = try Qimg.run(["backup", "--sync=incremental", "--bitmap=b", "--no-backing", "src.qcow2", "t.qcow2"], cwd: dir)
        expectCleanFailure("backup of a running VM", r)
        #expect(r.err == "qimg: src.qcow2: image is in use by a running VM (qemu-system-x86_64, pid \(vm.pid)); back up a running VM through its QEMU with --qmp SOCKET --node NODE (or read its NBD export with --nbd URI)\n",
                "stderr: \(r.err)")
        #expect(!B.exists(dir, "t.qcow2") && !B.hasTemporary(dir, of: "t.qcow2"))
    }

    /// SIGTERM and SIGINT stop convert too: exit 143 / 130, one line, no output file and no
    /// temporary file left.
    @Test(.requiresQEMU, arguments: [SIGTERM, SIGINT])
    func convertInterrupted(_ sig: Int32) throws {
        let dir = try B.scratch("convert-signal")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "512M"], dir)
        try B.tool(["qemu-io", "-c", "write -P 0x5a 0 512M", "src.qcow2"], dir)
        // Compression keeps the copy busy for seconds; the signal comes once the output is being written.
        let p = try B.interrupt(["convert", "-c", "-O", "qcow2", "src.qcow2", "out.qcow2"], dir, tmp: "out.qcow2", extra: 0.05, signal: sig)
        #expect(!p.signaled && p.status == 128 + sig, "\(p.summary): \(p.err)")
        #expect(p.stderrLines.count == 1 && p.err.contains("interrupted by \(sig == SIGTERM ? "SIGTERM" : "SIGINT"); out.qcow2 was not written"), "stderr: \(p.err)")
        #expect(!B.exists(dir, "out.qcow2") && !B.hasTemporary(dir, of: "out.qcow2"))
    }

    /// convert -p off a terminal prints what qemu-img prints: `    (P/100%)\r` lines that
    /// never go backwards, from 0.00 to 100.00, then a newline; on a sparse image too.
    @Test(.requiresQEMU) func convertProgressReaches100LikeQemuImg() throws {
        let dir = try B.scratch("progress")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "src.qcow2", "1G"], dir)
        try B.tool(["qemu-io", "-c", "write -P 1 0 3M", "-c", "write -P 2 500M 5M", "-c", "write -P 3 1000M 1M", "src.qcow2"], dir)
        let theirs = try Runner.qemuImg(["convert", "-p", "-O", "qcow2", "src.qcow2", "q.qcow2"], cwd: dir)
        let mine = try Qimg.run(["convert", "-p", "-O", "qcow2", "src.qcow2", "m.qcow2"], cwd: dir)
        #expect(mine.status == 0, "\(mine.summary): \(mine.err)")
        for (who, out) in [("qemu-img", theirs.out), ("qimg", mine.out)] {
            #expect(out.hasPrefix("    (0.00/100%)\r") && out.hasSuffix("    (100.00/100%)\r\n"), "\(who): \(out.debugDescription)")
            let values = out.dropLast().split(separator: "\r").map { Double($0.trimmingCharacters(in: .whitespaces).dropFirst().prefix { $0 != "/" }) ?? -1 }
            #expect(values == values.sorted() && !values.contains(-1), "\(who): not monotonic: \(values)")
        }
        try B.expectIdentical("q.qcow2", "m.qcow2", dir, "progress run")
        // On a terminal (script(1) gives a pty): the redrawn line ends at 100%.
        if let script = Env.which("script") {
            let tty = try Runner.run(script, ["-qec", "\(Qimg.path) convert -p -O raw src.qcow2 t.raw", "/dev/null"], cwd: dir)
            #expect(tty.status == 0 && tty.out.contains("(100.00/100%)"), "on a terminal: \(tty.out.debugDescription)")
        }
    }

    /// Errors name the target the user gave, never a temporary file; a directory target is
    /// refused before anything is copied; convert refuses an output that is its source.
    @Test(.requiresQEMU) func targetsNamedAndRefused() throws {
        let dir = try B.scratch("names")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.makeDirtySource(dir, size: "16M", dirtyMiB: 2)
        try FileManager.default.createDirectory(atPath: dir + "/adir", withIntermediateDirectories: false)
        let src = try B.bytes(dir, "src.qcow2")
        let cases: [([String], String)] = [
            (["backup", "--sync=full", "src.qcow2", "missing/t.qcow2"], "qimg: missing/t.qcow2: create failed: No such file or directory"),
            (["convert", "-O", "qcow2", "src.qcow2", "missing/t.qcow2"], "qimg: missing/t.qcow2: create failed: No such file or directory"),
            (["convert", "-O", "qcow2", "src.qcow2", "adir"], "qimg: adir: is a directory"),
            (["convert", "-O", "qcow2", "src.qcow2", "./src.qcow2"], "qimg: ./src.qcow2: the output is the source image or in its backing chain ('src.qcow2'); it cannot be overwritten by the copy"),
            (["convert", "-n", "-O", "qcow2", "src.qcow2", "src.qcow2"], "qimg: src.qcow2: the output is the source image or in its backing chain ('src.qcow2'); it cannot be overwritten by the copy"),
        ]
        for (args, line) in cases {
            let r = try Qimg.run(args, cwd: dir)
            expectCleanFailure(args.joined(separator: " "), r)
            #expect(r.err == line + "\n", "\(args): stderr \(r.err)")
            #expect(!r.err.contains("qimg-tmp"))
        }
        #expect(try B.bytes(dir, "src.qcow2") == src, "the source changed")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir + "/adir").isEmpty)
        #expect(!B.exists(dir, "missing"))
    }

    /// A file shorter than its qcow2 header: qemu-img's words ("qcow2 header too short"); and
    /// a qcow2 magic without a version probes as raw, as in QEMU.
    @Test(.requiresQEMU) func shortHeaders() throws {
        let dir = try B.scratch("short")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "full.qcow2", "16M"], dir)
        let head = try B.bytes(dir, "full.qcow2")
        for n in [100, 72, 50] {
            FileManager.default.createFile(atPath: dir + "/h\(n).qcow2", contents: head.prefix(n))
            let q = try Runner.qemuImg(["info", "h\(n).qcow2"], cwd: dir)
            let m = try Qimg.run(["info", "h\(n).qcow2"], cwd: dir)
            #expect(q.status == 1 && q.err.contains("qcow2 header too short"), "qemu-img on \(n) bytes: \(q.err)")
            #expect(m.status == 1 && m.err.hasPrefix("qimg: h\(n).qcow2: qcow2 header too short"), "qimg on \(n) bytes: \(m.err)")
        }
        FileManager.default.createFile(atPath: dir + "/h4.qcow2", contents: head.prefix(4))
        let q = try Runner.qemuImg(["info", "--output=json", "h4.qcow2"], cwd: dir)
        let m = try Qimg.run(["info", "--output=json", "h4.qcow2"], cwd: dir)
        #expect(q.status == 0 && m.status == 0 && q.out == m.out, "4 bytes: qemu-img \(q.out) qimg \(m.out) \(m.err)")
    }

    /// File names are bytes: a name that is not UTF-8 (given on the command line, or stored
    /// as a backing file name) is created, opened and printed exactly, and qimg's output on
    /// such images is byte-identical to qemu-img's (human and JSON).
    @Test(.requiresQEMU) func nonUTF8FileNames() throws {
        let dir = try B.scratch("bytes")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let script = #"""
            set -eu
            Q="$1"
            bad=$(printf 'bad\377.qcow2'); lat=$(printf 'lat\351.qcow2'); out=$(printf 'out\376.raw')
            "$Q" create -q -f qcow2 "$bad" 1M
            qemu-img create -q -f qcow2 "$lat" 1M
            qemu-io -c 'write -P 7 0 64k' "$lat" >/dev/null
            "$Q" create -q -f qcow2 -b "$lat" -F qcow2 top.qcow2
            "$Q" io -c 'write -P 8 64k 64k' "$bad" >/dev/null
            "$Q" convert -O raw top.qcow2 "$out"
            qemu-img compare -q top.qcow2 "$out"
            "$Q" backup -q --sync=full --bitmap=b "$bad" "$(printf 'full\377.qcow2')"
            qemu-img compare -q "$bad" "$(printf 'full\377.qcow2')"
            for f in "$bad" "$lat" top.qcow2; do
                for o in human json; do
                    qemu-img info --output=$o "$f" > q.txt
                    "$Q" info --output=$o "$f" > m.txt
                    cmp q.txt m.txt
                done
            done
            "$Q" info "$(printf 'none\377.qcow2')" 2> err.txt || true
            printf 'qimg: none\377.qcow2: No such file or directory\n' | cmp - err.txt
            echo OK
            """#
        let r = try Runner.run("/bin/sh", ["-c", script, "sh", Qimg.path], cwd: dir)
        #expect(r.status == 0 && r.out == "OK\n", "\(r.summary): \(r.out)\(r.err)")
        // The names on disk are the exact bytes given.
        var names: Set<[UInt8]> = []
        if let d = opendir(dir) {
            while let e = readdir(d) {
                names.insert(withUnsafeBytes(of: e.pointee.d_name) { Array($0.prefix { $0 != 0 }) })
            }
            closedir(d)
        }
        for expected in [Array("bad".utf8) + [0xFF] + Array(".qcow2".utf8), Array("full".utf8) + [0xFF] + Array(".qcow2".utf8),
                         Array("out".utf8) + [0xFE] + Array(".raw".utf8)] {
            #expect(names.contains(expected), "no file named \(expected) in \(names)")
        }
    }
}
