import Foundation
import Testing
import TestSupport

/// The inputs in Tests/regressions (images on which qimg once crashed, hung or
/// changed its input; most were found by scripts/fuzz, and each has a .txt
/// next to it saying how) through five read-only commands. Each command must
/// end on its own (no signal) within 5 s with exit 0...127; a non-zero exit
/// must come with exactly one stderr line `qimg: ...` (check may instead
/// exit 2 or 3 and list ERROR/Leaked lines); and the file must keep its
/// bytes and mtime. Each input is run from a private copy, so a bug that
/// writes cannot touch the checked-in file. Subdirectories (such as new/,
/// where scripts/fuzz saves what it finds) and .txt/.md files are skipped.
/// These tests need no QEMU.

enum RegressionInputs {
    static let directory = Paths.packageRoot + "/Tests/regressions"

    /// A new scratch directory holding a copy of input `name` (the caller removes it).
    static func privateCopy(of name: String) throws -> String {
        let dir = Paths.scratch + "/regressions-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: directory + "/" + name, toPath: dir + "/" + name)
        return dir
    }

    /// The input files' names, sorted.
    static func names() -> [String] {
        let fm = FileManager.default
        guard let names = try? fm.contentsOfDirectory(atPath: directory) else { return [] }
        return names.filter { name in
            var isDir: ObjCBool = false
            guard fm.fileExists(atPath: directory + "/" + name, isDirectory: &isDir), !isDir.boolValue else {
                return false
            }
            return !name.hasPrefix(".") && !name.hasSuffix(".txt") && !name.hasSuffix(".md")
        }.sorted()
    }
}

enum RegressionCommand: String, CaseIterable, Sendable {
    case info, mapJSON, check, ioRead, bitmapDump

    func args(_ file: String) -> [String] {
        switch self {
        case .info: return ["info", file]
        case .mapJSON: return ["map", "--output=json", file]
        case .check: return ["check", file]
        case .ioRead: return ["io", "-c", "read 0 64k", file]
        case .bitmapDump: return ["bitmap", "--dump", file, "b"]
        }
    }
}

@Suite struct RegressionInputTests {
    @Test func regressionDirectoryExists() {
        var isDir: ObjCBool = false
        #expect(FileManager.default.fileExists(atPath: RegressionInputs.directory, isDirectory: &isDir)
                && isDir.boolValue, "missing \(RegressionInputs.directory)")
    }

    @Test(arguments: RegressionInputs.names())
    func regressionInputFailsCleanly(_ name: String) throws {
        let dir = try RegressionInputs.privateCopy(of: name)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/" + name
        let before = try FileState(path)

        for cmd in RegressionCommand.allCases {
            let r = try Qimg.run(cmd.args(name), cwd: dir, timeout: 5)
            let label = "\(name): \(r.command)"
            if r.timedOut {
                Issue.record("\(label): \(r.summary)")
                continue
            }
            if r.signaled {
                Issue.record("\(label): killed by signal \(r.status)")
                continue
            }
            if !(0...127).contains(r.status) {
                Issue.record("\(label): exit \(r.status), expected 0...127")
                continue
            }
            if cmd == .check && (r.status == 2 || r.status == 3) {
                #expect(r.stderrLines.allSatisfy { $0.hasPrefix("ERROR") || $0.hasPrefix("Leaked") },
                        "\(label): \(r.err)")
                continue
            }
            if r.status != 0 {
                expectCleanFailure(label, r)
            }
        }
        let after = try FileState(path)
        #expect(after.bytes == before.bytes, "\(name): file contents changed")
        #expect(after.mtimeSec == before.mtimeSec && after.mtimeNsec == before.mtimeNsec,
                "\(name): mtime changed")
    }

    /// The one writer every input goes through: `check -r all` on a private copy ends on
    /// its own (no signal) within 5 s of CPU time, with exit 0...127, and grows the file by
    /// no more than a repair may: to twice its length, or 16 clusters (at most 2 MiB each)
    /// past its end. Whether the repair succeeds depends on the input.
    @Test(arguments: RegressionInputs.names())
    func repairEndsAndStaysBounded(_ name: String) throws {
        let fm = FileManager.default
        let dir = try RegressionInputs.privateCopy(of: name)
        defer { try? fm.removeItem(atPath: dir) }
        let path = dir + "/" + name
        let length = { (try fm.attributesOfItem(atPath: path)[.size] as? Int) ?? 0 }
        let before = try length()
        let r = try Qimg.run(["check", "-r", "all", name], cwd: dir, timeout: 5)
        let label = "\(name): \(r.command)"
        #expect(!r.timedOut && !r.signaled && (0...127).contains(r.status), "\(label): \(r.summary)")
        let size = try length()
        #expect(size <= max(2 * before, before + 16 * (2 << 20)), "\(label): the file grew from \(before) to \(size) bytes")
    }
}
