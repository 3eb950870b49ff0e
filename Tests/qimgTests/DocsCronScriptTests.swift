import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// Docs/backup.md, run as printed. The cron script (the ```sh block that starts with
/// `#!/bin/sh`) runs unchanged, with IMG and DIR pointing into a scratch directory and the
/// qimg under test first on PATH; the other ```sh examples run with the document's paths
/// mapped into the same scratch directory:
///
///     /var/lib/libvirt/images          -> SCRATCH/images (the disk image: vm.qcow2)
///     /backup                          -> SCRATCH/backup (the chain: /backup/vm)
///     /usr/local/sbin/nightly-backup   -> SCRATCH/nightly-backup (the cron script)
///     20261129T023001.482915206.qcow2  -> the backup an example is run on
///
/// Guest writes (qemu-io) come between the runs. After every backup, QEMU's tools must
/// find: the new backup is named by a fixed-width timestamp and sorts after all the others
/// (the script picks the newest by name); it reads like the disk image (`qemu-img
/// compare`); an incremental holds exactly the clusters written since the run before
/// (`qemu-img map` of its top layer); every backup checks clean, is backed by the one
/// before it in name order under a relative name, and still reads like the disk did at its
/// own run. The whole directory moved elsewhere must still restore.
@Suite struct DocsCronScriptTests {
    static let document = Paths.packageRoot + "/Docs/backup.md"
    static let docImages = "/var/lib/libvirt/images"
    static let docBackup = "/backup"
    static let docScript = "/usr/local/sbin/nightly-backup"
    static let docSampleName = "20261129T023001.482915206.qcow2"
    static let cluster: UInt64 = 65536

    /// One ```sh block of the document and the heading it comes under.
    struct Example {
        var heading: String
        var text: String
    }

    static func examples() throws -> [Example] {
        let text = try String(contentsOfFile: document, encoding: .utf8)
        var out: [Example] = [], heading = "", block: [String]? = nil
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) {
            if var b = block {
                if line == "```" {
                    out.append(Example(heading: heading, text: b.joined(separator: "\n") + "\n"))
                    block = nil
                } else {
                    b.append(line)
                    block = b
                }
            } else if line == "```sh" {
                block = []
            } else if line.hasPrefix("#") {
                heading = line.drop(while: { $0 == "#" }).trimmingCharacters(in: .whitespaces)
            }
        }
        return out
    }

    /// The cron script, exactly as printed.
    static func cronScript(_ all: [Example]) throws -> String {
        let scripts = all.filter { $0.text.hasPrefix("#!/bin/sh\n") }
        guard scripts.count == 1 else { throw TestFailure("\(document): \(scripts.count) sh blocks start with #!/bin/sh, expected 1") }
        return scripts[0].text
    }

    /// The one example (not the cron script) under the heading that starts with `heading`.
    static func example(_ all: [Example], under heading: String) throws -> String {
        let found = all.filter { $0.heading.hasPrefix(heading) && !$0.text.hasPrefix("#!") }
        guard found.count == 1 else {
            throw TestFailure("\(document): \(found.count) sh examples under a heading '\(heading)...', expected 1")
        }
        return found[0].text
    }

    /// A scratch directory standing for the machine of the document.
    final class Machine {
        let root: String
        let images: String
        let backupRoot: String
        let script: String
        var image: String { images + "/vm.qcow2" }
        var dir: String { backupRoot + "/vm" }
        let environment: [String: String]
        /// The disk as it was at each backup's run (qcow2 copies), by backup name.
        var snapshots: [String: String] = [:]
        /// Guest writes since the last backup: (offset, length).
        var written: [(UInt64, UInt64)] = []

        init(script text: String) throws {
            root = try Paths.newScratch("docs-backup")
            images = root + "/images"
            backupRoot = root + "/backup"
            script = root + "/nightly-backup"
            for d in [images, backupRoot, root + "/snapshots", root + "/cwd"] {
                try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
            }
            try text.write(toFile: script, atomically: true, encoding: .utf8)
            chmod(script, 0o755)
            guard FileManager.default.isExecutableFile(atPath: Qimg.path) else {
                throw TestFailure("qimg binary not found at \(Qimg.path): run `swift build` first")
            }
            // The scripts call `qimg`: the binary under test, by that name, first on PATH.
            var bin = (Qimg.path as NSString).deletingLastPathComponent
            if (Qimg.path as NSString).lastPathComponent != "qimg" {
                bin = root + "/bin"
                try FileManager.default.createDirectory(atPath: bin, withIntermediateDirectories: true)
                try FileManager.default.createSymbolicLink(atPath: bin + "/qimg", withDestinationPath: Qimg.path)
            }
            let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
            environment = ["PATH": bin + ":" + path, "IMG": images + "/vm.qcow2", "DIR": backupRoot + "/vm"]
        }

        deinit { try? FileManager.default.removeItem(atPath: root) }

        /// The document's paths (and its sample backup name) mapped into this machine.
        func mapped(_ text: String, sample: String?) -> String {
            var pairs = [(docScript, script), (docImages, images), (docBackup, backupRoot)]
            if let sample { pairs.append((docSampleName, sample)) }
            var out = "", rest = Substring(text)
            outer: while !rest.isEmpty {
                for (from, to) in pairs where rest.hasPrefix(from) {
                    out += to
                    rest = rest.dropFirst(from.count)
                    continue outer
                }
                out.append(rest.removeFirst())
            }
            return out
        }

        /// Runs an example (mapped) with `sh -eu`, from the images directory.
        func run(example text: String, sample: String? = nil, _ label: String) throws -> RunResult {
            let r = try Runner.run("/bin/sh", ["-eu", "-c", mapped(text, sample: sample)], cwd: images,
                                   extraEnvironment: environment)
            guard r.exitedNormally, r.status == 0 else {
                throw TestFailure("\(label): \(r.summary)\n\(r.out)\(r.err)\n--- the example as run:\n\(mapped(text, sample: sample))")
            }
            return r
        }

        /// Runs the cron script as printed, from an unrelated directory.
        func runScript(_ label: String) throws {
            let r = try Runner.run(script, [], cwd: root + "/cwd", extraEnvironment: environment)
            guard r.exitedNormally, r.status == 0 else { throw TestFailure("\(label): the cron script: \(r.summary)\n\(r.out)\(r.err)") }
        }

        func guestWrite(_ pattern: Int, _ offset: UInt64, _ length: UInt64) throws {
            try BackupTests.tool(["qemu-io", "-f", "qcow2", "-c", "write -P \(pattern) \(offset) \(length)", "vm.qcow2"], images)
            written.append((offset, length))
        }

        /// The backups in `dir` (every *.qcow2; temporary and partial files end otherwise),
        /// in name order.
        func backups(in dir: String? = nil) -> [String] {
            let names = (try? FileManager.default.contentsOfDirectory(atPath: dir ?? self.dir)) ?? []
            return names.filter { $0.hasSuffix(".qcow2") }.sorted()
        }

        /// The clusters the writes since the last backup touched, as merged [start, length] ranges.
        func writtenClusters() -> [[UInt64]] {
            var clusters = Set<UInt64>()
            for (off, len) in written where len > 0 {
                for c in (off / cluster)...((off + len - 1) / cluster) { clusters.insert(c) }
            }
            var out: [[UInt64]] = []
            for c in clusters.sorted() {
                if let last = out.last, last[0] + last[1] == c * cluster { out[out.count - 1][1] += cluster } else { out.append([c * cluster, cluster]) }
            }
            return out
        }

        /// After a run that must have added one backup: checks it and the whole chain, and
        /// keeps a copy of the disk as the new backup holds it.
        func expectNewBackup(after before: [String], full: Bool, _ label: String,
                             sourceLocation: SourceLocation = #_sourceLocation) throws {
            let now = backups()
            let added = now.filter { !before.contains($0) }
            guard added.count == 1, now.count == before.count + 1, let newest = added.first else {
                Issue.record("\(label): expected one new backup besides \(before), found \(now) in \(dir): \((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [])",
                             sourceLocation: sourceLocation)
                throw TestFailure("\(label): no new backup")
            }
            #expect(newest.range(of: #"^[0-9]{8}T[0-9]{6}\.[0-9]{9}\.qcow2$"#, options: .regularExpression) != nil,
                    "\(label): \(newest) is not named YYYYMMDDTHHMMSS.NNNNNNNNN.qcow2", sourceLocation: sourceLocation)
            #expect(newest == now.last, "\(label): the new backup \(newest) does not sort last: \(now)", sourceLocation: sourceLocation)
            try BackupTests.expectIdentical(image, dir + "/" + newest, root, "\(label): the newest backup, \(newest), and the disk",
                                            sourceLocation: sourceLocation)
            if full {
                #expect(try BackupTests.backingFile(newest, dir) == nil, "\(label): the full backup \(newest) has a backing file",
                        sourceLocation: sourceLocation)
            } else {
                let backing = try BackupTests.backingFile(newest, dir)
                #expect(backing == before.last,
                        "\(label): \(newest) is backed by \(backing ?? "nothing"), expected the newest backup before it, \(before.last ?? "none"), by name",
                        sourceLocation: sourceLocation)
                let top = try BackupTests.topLayer(newest, dir)
                #expect(top == writtenClusters(), "\(label): \(newest) holds \(top), the writes since the last run touched \(writtenClusters())",
                        sourceLocation: sourceLocation)
            }
            try expectChain(in: dir, label, sourceLocation: sourceLocation)
            let snapshot = root + "/snapshots/" + newest
            try BackupTests.tool(["qemu-img", "convert", "-O", "qcow2", image, snapshot], root)
            snapshots[newest] = snapshot
            written = []
        }

        /// Every backup in `dir` checks clean, is backed by the one before it in name order
        /// (relative name; the first has none) and reads like the disk did at its run.
        func expectChain(in dir: String, _ label: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
            var previous: String? = nil
            for name in backups(in: dir) {
                try expectCheckClean(name, dir, label, sourceLocation: sourceLocation)
                let backing = try BackupTests.backingFile(name, dir)
                #expect(backing == previous,
                        "\(label): \(name) is backed by \(backing ?? "nothing"), expected \(previous.map { "\($0), the backup before it by name (a relative name)" } ?? "nothing (the first backup is the full one)")",
                        sourceLocation: sourceLocation)
                if let snapshot = snapshots[name] {
                    try BackupTests.expectIdentical(snapshot, dir + "/" + name, root, "\(label): \(name) and the disk at its run",
                                                    sourceLocation: sourceLocation)
                }
                previous = name
            }
        }
    }

    @Test(.requiresQEMU) func documentedWorkflowRestoresEveryRun() throws {
        let all = try Self.examples()
        let once = try Self.example(all, under: "Once")
        let nightly = try Self.example(all, under: "Every night")
        let restore = try Self.example(all, under: "Restore")
        let verify = try Self.example(all, under: "Verify")
        let prune = try Self.example(all, under: "Prune")
        let afterCrash = try Self.example(all, under: "After a crash")
        let m = try Machine(script: try Self.cronScript(all))

        try BackupTests.tool(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "64M"], m.images)
        try m.guestWrite(0x11, 0, 3 << 20)
        try m.guestWrite(0x12, 40 << 20, 100_000)

        // By hand: the full backup, then an incremental.
        _ = try m.run(example: once, "Once")
        try m.expectNewBackup(after: [], full: true, "the full backup by hand")
        try m.guestWrite(0x21, 1_000_000, 70_000)
        try m.guestWrite(0x22, 50 << 20, 512)
        var before = m.backups()
        _ = try m.run(example: nightly, "Every night")
        try m.expectNewBackup(after: before, full: false, "the incremental by hand")

        // The cron script: runs with writes between them, and two runs back to back with no
        // write between them (often within one second: the names must still differ).
        let rounds: [[(Int, UInt64, UInt64)]] = [[(0x31, 2 << 20, 200_000)], [], [], [(0x41, 0, 4096), (0x42, 63 << 20, 1 << 20)]]
        for (round, writes) in rounds.enumerated() {
            for w in writes { try m.guestWrite(w.0, w.1, w.2) }
            before = m.backups()
            try m.runScript("cron run \(round + 1)")
            try m.expectNewBackup(after: before, full: false, "cron run \(round + 1)")
        }

        // Verify and restore, on the newest and on an older backup.
        let names = m.backups()
        let verified = try m.run(example: verify, sample: names.last!, "Verify")
        #expect(verified.out.contains("Images are identical."), "Verify: \(verified.out)")
        _ = try m.run(example: restore, sample: names[1], "Restore")
        let restored = m.images + "/restored.qcow2"
        #expect(try BackupTests.backingFile(restored, m.images) == nil, "the restored image has a backing file")
        try BackupTests.expectIdentical(m.snapshots[names[1]]!, restored, m.root, "Restore of \(names[1])")

        // Prune the oldest incremental into the full backup, then back up on top.
        _ = try m.run(example: prune, "Prune")
        #expect(m.backups() == Array(names.dropFirst()), "after Prune: \(m.backups()), expected \(Array(names.dropFirst()))")
        try m.expectChain(in: m.dir, "after Prune")
        try m.guestWrite(0x51, 7 << 20, 3 * 65536 + 1)
        before = m.backups()
        try m.runScript("cron run after Prune")
        try m.expectNewBackup(after: before, full: false, "cron run after Prune")

        // The directory moved elsewhere still restores, every backup of it.
        let moved = m.root + "/elsewhere/vm"
        try FileManager.default.createDirectory(atPath: m.root + "/elsewhere", withIntermediateDirectories: true)
        try FileManager.default.moveItem(atPath: m.dir, toPath: moved)
        try m.expectChain(in: moved, "moved elsewhere")
        try BackupTests.tool(["qemu-img", "convert", "-O", "qcow2", moved + "/" + m.backups(in: moved).last!, "from-moved.qcow2"], m.root)
        try BackupTests.expectIdentical(m.image, m.root + "/from-moved.qcow2", m.root, "restore of the moved newest backup")
        try FileManager.default.moveItem(atPath: moved, toPath: m.dir)

        // After a crash: a new chain; the old one, moved aside, still restores.
        let old = m.backups()
        try m.guestWrite(0x61, 9 << 20, 65536)
        _ = try m.run(example: afterCrash, "After a crash")
        let aside = try FileManager.default.contentsOfDirectory(atPath: m.backupRoot).filter { $0.hasPrefix("vm.") }
        try #require(aside.count == 1, "After a crash: the old chain moved aside as /backup/vm.*: \(aside)")
        #expect(m.backups(in: m.backupRoot + "/" + aside[0]) == old, "After a crash: the old chain moved aside")
        try m.expectChain(in: m.backupRoot + "/" + aside[0], "the old chain, moved aside")
        try m.expectNewBackup(after: [], full: true, "After a crash: the new full backup")
        try m.guestWrite(0x71, 20 << 20, 10)
        before = m.backups()
        try m.runScript("cron run on the new chain")
        try m.expectNewBackup(after: before, full: false, "cron run on the new chain")
    }
}
