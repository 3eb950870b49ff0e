import Foundation
import Testing
import TestSupport

/// A short run of the crash-consistency harness `scripts/crashtest` (Docs/reliability.md,
/// "Crash consistency"): 3 effective SIGKILLs per operation kind (io writes, bitmap edits,
/// backups, commit/rebase, convert) with a fixed seed, against the debug binary under test.
/// The harness checks every image with qemu-img check, the guest data against a shadow,
/// the bitmaps with qemu-nbd/nbdinfo and the backup targets; it exits 0 only when nothing
/// was violated and every kind reached its kills. `make crashtest` runs the full campaign.
@Suite struct CrashHarnessTests {
    static let script = Paths.packageRoot + "/scripts/crashtest"
    static let seed = "20261127"

    @Test(.requiresQEMU)
    func shortCrashCampaignPasses() throws {
        guard let python3 = Env.python3 else { throw TestFailure("python3 not found on PATH") }
        for tool in ["qemu-nbd", "nbdinfo"] where Env.which(tool) == nil {
            throw TestFailure("\(tool) not found on PATH (make deps: qemu-utils, libnbd-bin)")
        }
        guard FileManager.default.isExecutableFile(atPath: Qimg.path) else {
            throw TestFailure("qimg binary not found at \(Qimg.path): run `swift build` first")
        }
        let work = try Paths.newScratch("crashtest")
        defer { try? FileManager.default.removeItem(atPath: work) }

        let started = Date()
        let r = try Runner.run(python3, [Self.script, "--kills", "3", "--seed", Self.seed,
                                         "--qimg", Qimg.path, "--workdir", work + "/run"],
                               cwd: Paths.packageRoot, timeout: 170)
        let seconds = Date().timeIntervalSince(started)
        print("CrashHarnessTests: scripts/crashtest --kills 3 --seed \(Self.seed): \(r.summary), \(String(format: "%.1f", seconds)) s")
        #expect(r.exitedNormally && r.status == 0, """
            scripts/crashtest --kills 3 --seed \(Self.seed) --qimg \(Qimg.path): \(r.summary)
            (exit 1: violations, failing cases saved under /tmp/qimg-crashtest-fail-*; exit 2: too few effective kills)
            \(r.out.suffix(6000))\(r.err.suffix(2000))
            """)
        #expect(r.out.contains("crashtest: PASS"), "no PASS line in the output:\n\(r.out.suffix(3000))")
    }
}
