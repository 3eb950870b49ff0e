// The backup repository as Docs/backup.md and `make demo` present it: the crontab line of
// the document, run as cron runs it (`/bin/sh -c` with nothing but PATH=/usr/bin:/bin), and
// scripts/demo.sh's simulated week, whose restores QEMU's qemu-img compare judges.

import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

@Suite struct RepositoryCronTests {
    typealias B = BackupTests
    static let document = Paths.packageRoot + "/Docs/backup.md"

    /// The crontab line of Docs/backup.md (`M H * * * /usr/local/bin/qimg backup --repo ...`).
    static func crontabLine() throws -> String {
        let text = try String(contentsOfFile: document, encoding: .utf8)
        let lines = text.split(separator: "\n").map(String.init).filter { $0.contains(" * * * /usr/local/bin/qimg backup --repo ") }
        guard lines.count == 1, let line = lines.first else { throw TestFailure("Docs/backup.md: expected one crontab line of qimg backup --repo, found \(lines)") }
        return line
    }

    /// The document's crontab command (the five time fields dropped) with its paths mapped
    /// into `dir`, run twice as cron would, with guest writes between: a full, then an
    /// incremental; each run appends one line to the log; the newest point restores as
    /// the disk (qemu-img compare). The exit codes the document explains are RepoExit's.
    @Test(.requiresQEMU) func crontabLineRunsUnderCronsPath() throws {
        let dir = try Paths.newScratch("repo-crontab")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let line = try Self.crontabLine()
        let fields = line.split(separator: " ", maxSplits: 5, omittingEmptySubsequences: true)
        #expect(fields.count == 6 && fields[0...4].allSatisfy { $0 == "*" || Int($0) != nil }, "\(line)")
        var command = String(fields.last ?? "")
        #expect(command.hasPrefix("/usr/local/bin/qimg "), "qimg by its absolute path: \(command)")
        #expect(command.contains(" --log "), "\(command)")
        for (from, to) in [("/usr/local/bin/qimg", Qimg.path), ("/backup/", dir + "/backup/"), ("/var/log/", dir + "/log/"),
                           ("/var/lib/libvirt/images/", dir + "/images/")] {
            command = command.replacingOccurrences(of: from, with: to)
        }
        for d in ["backup", "log", "images"] { try FileManager.default.createDirectory(atPath: dir + "/" + d, withIntermediateDirectories: true) }
        try B.tool(["qemu-img", "create", "-q", "-f", "qcow2", "images/vm.qcow2", "8M"], dir)
        let log = dir + "/log/qimg-backup.log"
        for night in 1...2 {
            try B.tool(["qemu-io", "-c", "write -P \(night) \(night)M 300k", "images/vm.qcow2"], dir)
            let r = try Runner.run("/usr/bin/env", ["-i", "PATH=/usr/bin:/bin", "/bin/sh", "-c", command], cwd: "/")
            #expect(r.exitedNormally && r.status == 0 && r.err.isEmpty, "night \(night): \(r.summary): \(r.err)")
            let logged = try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n")
            #expect(logged.count == night, "one log line per run: \(logged)")
            #expect(logged.last?.contains(night == 1 ? ": full (no chain)" : ": incremental on 000001") == true, "\(logged)")
        }
        try B.qimg(["repo", "restore", "backup/repo", "newest.qcow2"], dir)
        try B.expectIdentical("images/vm.qcow2", "newest.qcow2", dir, "the newest point")
        let text = try String(contentsOfFile: Self.document, encoding: .utf8)
        for code in 0...5 { #expect(text.contains("\n| \(code) | "), "Docs/backup.md explains exit code \(code)") }
    }

    /// `make demo`'s script, into a scratch directory with the qimg under test: a week of
    /// nights with writes, a run killed mid-copy, a locked run, restores of every day, a
    /// prune, verify and restores compared with qemu-img compare. It exits 0 only when every
    /// command succeeded and every comparison found the images identical.
    @Test(.requiresQEMU) func demoRunsTheWeek() throws {
        let dir = try Paths.newScratch("repo-demo")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try Runner.run("/bin/bash", [Paths.packageRoot + "/scripts/demo.sh"],
                               extraEnvironment: ["QIMG": Qimg.path, "DEMO_DIR": dir + "/demo"], timeout: 600)
        #expect(r.exitedNormally && r.status == 0, "\(r.summary): \(r.err)")
        let out = r.out
        for day in 1...7 { #expect(out.contains("identical: the newest point of day \(day) is that day's disk"), "day \(day)") }
        #expect(out.contains("(killed: exit 137)"), "the run of day 4 is killed")
        #expect(out.contains("removed what killed runs left"), "the next run says what it removed")
        #expect(out.contains("(exit 3: 3 means the repository is locked by another run)"))
        #expect(out.contains("identical: the point of day 5, after the prune") && out.contains("identical: the newest point is the disk as it is now"))
        #expect(!out.contains("DIFFERENT"))
    }
}
