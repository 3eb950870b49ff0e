import Foundation
import Testing
@testable import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// The test harness's own guarantees (Tests/Support/TestSupport.swift): `Runner.run`'s
/// `timeout` is a limit on the child's CPU time, which a loaded machine cannot trip, and
/// `PipedProcess` reports a child's death instead of waiting for a line forever.
@Suite struct RunnerTests {
    @Test func cpuLimitStopsASpinningChild() throws {
        let r = try Runner.run("/bin/sh", ["-c", "while :; do :; done"], cwd: Paths.packageRoot, timeout: 1)
        #expect(r.timedOut && r.signaled && (r.status == SIGXCPU || r.status == SIGKILL), "\(r.summary)")
        #expect(!r.exitedNormally)
        #expect(r.summary.contains("CPU-time limit of 1 s"), "\(r.summary)")
    }

    /// Two seconds of sleeping use no CPU time: a child that waits (or is kept waiting by
    /// a busy machine) longer than its limit is not killed.
    @Test func waitingIsNotLimited() throws {
        let r = try Runner.run("/bin/sleep", ["2"], cwd: Paths.packageRoot, timeout: 1)
        #expect(r.exitedNormally && r.status == 0, "\(r.summary)")
    }

    /// The command runs (prlimit execs it in place) with the limit asked for and the extra
    /// environment.
    @Test func childRunsUnderItsLimitWithItsEnvironment() throws {
        let r = try Runner.run("/bin/sh", ["-c", "echo $QIMG_RUNNER_TEST; ulimit -t"], cwd: Paths.packageRoot,
                               extraEnvironment: ["QIMG_RUNNER_TEST": "x1"], timeout: 7)
        #expect(r.exitedNormally && r.status == 0, "\(r.summary)")
        #expect(r.out == "x1\n7\n", "\(r.out)")
    }

    @Test func pipedProcessReportsADeadChild() throws {
        let p = try PipedProcess("/bin/sh", ["-c", "echo starting; exit 3"])
        #expect(throws: TestFailure.self) { try p.waitForLine(containing: "ready") }
        #expect(p.printed == "starting\n")
        let q = try PipedProcess("/bin/sh", ["-c", "read line; echo \"got $line\"; exec sleep 600"])
        try q.send("ping\n")
        #expect(try q.waitForLine(containing: "got") == "got ping")
        q.stop()
        #expect(!q.process.isRunning)
    }
}
