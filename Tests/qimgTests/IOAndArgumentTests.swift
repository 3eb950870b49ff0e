import Foundation
import Testing
import TestSupport

/// `qimg io -c 'read [-P PATTERN] OFF LEN'` on ranges whose content
/// Fixtures/README.md documents, cross-checked with qemu-io.
struct PatternRead: Sendable, Hashable, CustomTestStringConvertible {
    var name: String
    var format: String
    var pattern: String
    var offset: UInt64
    var length: UInt64
    var matches: Bool

    var command: String { "read -P \(pattern) \(offset) \(length)" }
    var testDescription: String { "\(name): \(command)\(matches ? "" : " (wrong pattern)")" }

    static let all: [PatternRead] = [
        PatternRead(name: "plain.raw", format: "raw", pattern: "0x11", offset: 0, length: 65536, matches: true),
        PatternRead(name: "c64k.qcow2", format: "qcow2", pattern: "0xa1", offset: 0, length: 65636, matches: true),
        PatternRead(name: "c64k.qcow2", format: "qcow2", pattern: "0", offset: 655360, length: 131072, matches: true),
        PatternRead(name: "c512.qcow2", format: "qcow2", pattern: "0x5c", offset: 1_000_000, length: 300_000, matches: true),
        PatternRead(name: "zlib.qcow2", format: "qcow2", pattern: "0x5a", offset: 1_572_864, length: 300_000, matches: true),
        PatternRead(name: "xl2.qcow2", format: "qcow2", pattern: "0x15", offset: 331_000, length: 62216, matches: true),
        PatternRead(name: "xl2.qcow2", format: "qcow2", pattern: "0", offset: 327_680, length: 2048, matches: true),
        PatternRead(name: "xl2-top.qcow2", format: "qcow2", pattern: "0x42", offset: 130_000, length: 70000, matches: true),
        PatternRead(name: "chain2-top.qcow2", format: "qcow2", pattern: "0xb1", offset: 4096, length: 61140, matches: true),
        PatternRead(name: "rel/top.qcow2", format: "qcow2", pattern: "0xa5", offset: 3_211_264, length: 458_752, matches: true),
        PatternRead(name: "short-top.qcow2", format: "qcow2", pattern: "0x51", offset: 200, length: 696_120, matches: true),
        PatternRead(name: "c64k.qcow2", format: "qcow2", pattern: "0xa2", offset: 0, length: 65536, matches: false),
        PatternRead(name: "zlib.qcow2", format: "qcow2", pattern: "0", offset: 1_572_864, length: 300_000, matches: false),
        PatternRead(name: "xl2-top.qcow2", format: "qcow2", pattern: "0x41", offset: 130_000, length: 70000, matches: false),
    ]
}

@Suite struct IOReadTests {
    @Test(.requiresQEMU, arguments: PatternRead.all)
    func patternRead(_ c: PatternRead) throws {
        let f = try Fixtures.get()
        let qemu = try Runner.qemuIO(["-r", "-f", c.format, "-c", c.command, c.name], cwd: f.validDir)
        #expect(qemu.status == (c.matches ? 0 : 1), "qemu-io \(c.command) on \(c.name) exited \(qemu.status): test data wrong?")
        let mine = try Qimg.run(["io", "-f", c.format, "-c", c.command, c.name], cwd: f.validDir)
        if c.matches {
            #expect(mine.exitedNormally && mine.status == 0,
                    "\(c.testDescription): \(mine.summary): \(mine.stderrLines.first ?? "")")
            let firstLine = mine.out.split(separator: "\n").first.map(String.init)
            #expect(firstLine == "read \(c.length)/\(c.length) bytes at offset \(c.offset)")
        } else {
            #expect(mine.exitedNormally && mine.status == 1, "\(c.testDescription): \(mine.summary)")
        }
    }

    @Test(.requiresQEMU) func plainReadSucceeds() throws {
        let f = try Fixtures.get()
        let mine = try Qimg.run(["io", "-c", "read 0 512", "eof-compressed.qcow2"], cwd: f.validDir)
        #expect(mine.exitedNormally && mine.status == 0, "\(mine.summary): \(mine.err)")
    }
}

/// Command-line errors: exit 1 (or at least non-zero) and one `qimg:` line.
@Suite struct ArgumentTests {
    /// A scratch directory holding a 1 MiB raw file `disk.raw`.
    static func scratchWithDisk() throws -> String {
        let dir = Paths.scratch + "/args-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: dir + "/disk.raw", contents: Data(count: 1 << 20))
        return dir
    }

    @Test func infoOnMissingFile() throws {
        let dir = try Self.scratchWithDisk()
        let r = try Qimg.run(["info", "does-not-exist.qcow2"], cwd: dir)
        expectCleanFailure("info does-not-exist.qcow2", r, exitCode: 1)
    }

    @Test func mapWithBadStartOffset() throws {
        let dir = try Self.scratchWithDisk()
        let r = try Qimg.run(["map", "--start-offset=zz", "disk.raw"], cwd: dir)
        expectCleanFailure("map --start-offset=zz", r)
    }

    @Test func unknownSubcommand() throws {
        let dir = try Self.scratchWithDisk()
        let r = try Qimg.run(["bogus"], cwd: dir)
        #expect(r.exitedNormally && r.status != 0, "qimg bogus: \(r.summary)")
    }

    @Test func infoOnRawScratchDisk() throws {
        let dir = try Self.scratchWithDisk()
        let r = try Qimg.run(["info", "--output=json", "disk.raw"], cwd: dir)
        #expect(r.exitedNormally && r.status == 0, "\(r.summary): \(r.err)")
        #expect(r.out.contains("\"virtual-size\": 1048576"))
    }
}
