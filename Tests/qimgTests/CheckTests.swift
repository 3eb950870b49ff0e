import Foundation
import Testing
import TestSupport

/// `qimg check` against `qemu-img check`: the same exit code (0 clean,
/// 2 corruptions, 3 leaks only, 63 unsupported format) and the same stdout.
/// QEMU prints the individual ERROR/Leaked lines on stderr; only stdout is
/// compared.

enum CheckMode: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case human, json

    var args: [String] { self == .json ? ["--output=json"] : [] }
    var testDescription: String { (["check"] + args).joined(separator: " ") }
}

@Suite struct CheckTests {
    @Test(.requiresQEMU, arguments: try Fixtures.qcow2ManifestArguments(), CheckMode.allCases)
    func checkCleanImageMatchesQemuImg(_ entry: ManifestEntry, _ mode: CheckMode) throws {
        let f = try Fixtures.get()
        let args = ["check", "-f", "qcow2"] + mode.args + [entry.name]
        let (qemu, mine) = try runBoth(args, cwd: f.validDir)
        let label = "\(entry.name): \(mode.testDescription)"
        try #require(qemu.status == 0, "\(label): fixture is not clean for qemu-img (exit \(qemu.status))")
        expectSameExit(label, qemu: qemu, qimg: mine)
        expectSameStdout(label, qemu: qemu, qimg: mine)
    }

    @Test(.requiresQEMU, arguments: try Fixtures.corruptArguments(), CheckMode.allCases)
    func checkCorruptImageMatchesQemuImg(_ entry: CorruptEntry, _ mode: CheckMode) throws {
        let f = try Fixtures.get()
        let args = ["check", "-f", "qcow2"] + mode.args + [entry.name]
        let (qemu, mine) = try runBoth(args, cwd: f.corruptDir)
        let label = "\(entry.name): \(mode.testDescription)"
        #expect(qemu.status == entry.qemuCheckExit,
                "\(label): qemu-img check exited \(qemu.status), corrupt.tsv says \(entry.qemuCheckExit)")
        if !mine.exitedNormally || mine.status != entry.qemuCheckExit {
            Issue.record("\(label): \(mine.summary), expected exit \(entry.qemuCheckExit) like qemu-img check")
        }
        expectSameStdout(label, qemu: qemu, qimg: mine)
    }

    @Test(.requiresQEMU) func checkRawIsUnsupported() throws {
        let f = try Fixtures.get()
        let (qemu, mine) = try runBoth(["check", "-f", "raw", "plain.raw"], cwd: f.validDir)
        #expect(qemu.status == 63, "qemu-img check -f raw exited \(qemu.status)")
        expectCleanFailure("check -f raw plain.raw", mine, exitCode: 63)
    }
}
