import Foundation
import Testing
import TestSupport

/// The qimg binary under test: `.build/debug/qimg` in the package root, or
/// $QIMG_BINARY (the sanitizer runs point it at their own build).
/// `swift build` (or `swift test`, which builds every product) creates it.
enum Qimg {
    static let path = ProcessInfo.processInfo.environment["QIMG_BINARY"].map {
        $0.hasPrefix("/") ? $0 : Paths.packageRoot + "/" + $0
    } ?? Paths.packageRoot + "/.build/debug/qimg"

    /// Runs qimg; throws (failing the test) when the binary is missing.
    static func run(_ args: [String], cwd: String, timeout: Double = 60) throws -> RunResult {
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw TestFailure("qimg binary not found at \(path): run `swift build` first")
        }
        return try Runner.run(path, args, cwd: cwd, timeout: timeout)
    }
}

/// qemu-img's stderr as qimg prints it: `qimg: ` for `qemu-img: `, continuation lines
/// joined to their message with a space.
func qimgMessages(_ err: String) -> String {
    var lines: [String] = []
    for l in err.split(separator: "\n") {
        if l.hasPrefix("qemu-img: ") {
            lines.append("qimg: " + l.dropFirst(10))
        } else if lines.isEmpty {
            lines.append(String(l))
        } else {
            lines[lines.count - 1] += " " + l
        }
    }
    return lines.map { $0 + "\n" }.joined()
}

/// Runs the same arguments through qemu-img and qimg in `cwd`.
func runBoth(_ args: [String], cwd: String) throws -> (qemu: RunResult, qimg: RunResult) {
    let qemu = try Runner.qemuImg(args, cwd: cwd)
    let mine = try Qimg.run(args, cwd: cwd)
    return (qemu, mine)
}

@Suite struct Setup {
    @Test func qimgBinaryExists() {
        #expect(FileManager.default.isExecutableFile(atPath: Qimg.path),
                "qimg binary not found at \(Qimg.path): run `swift build` first")
    }

    @Test(.requiresQEMU) func fixturesGenerated() throws {
        // With CI=true and no QEMU, get() throws: the run fails.
        let f = try Fixtures.get()
        #expect(f.manifest.count >= 40, "manifest.tsv has \(f.manifest.count) entries")
        #expect(f.corrupt.count >= 6, "corrupt.tsv has \(f.corrupt.count) entries")
        #expect(f.malformed.count >= 20, "malformed.tsv has \(f.malformed.count) entries (at least 20 must run)")
        for e in f.manifest {
            #expect(FileManager.default.fileExists(atPath: f.validDir + "/" + e.name), "missing fixture \(e.name)")
        }
    }
}
