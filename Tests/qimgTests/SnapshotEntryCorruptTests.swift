import Foundation
import Testing
import TestSupport

/// An image with one corrupt snapshot table entry (issue 13 item 8): qemu-img opens it,
/// info and map show the active image, check reports the entry ("snapshot table entry
/// corrupted") with exit 2. qimg must print the same; its writers refuse the image (one
/// line, the file untouched), where qemu-img's behaviour varies with the damage.

enum SnapshotEntryDamage: String, CaseIterable, Sendable {
    case unaligned, tooLarge, pastEnd, unalignedAndTooLarge

    /// The first entry's new (l1_table_offset, l1_size).
    func patch(offset: UInt64, size: UInt32) -> (UInt64, UInt32) {
        switch self {
        case .unaligned: return (offset + 512, size)
        case .tooLarge: return (offset, 0x200_0001)
        case .pastEnd: return (0x1_0000_0000, size)
        case .unalignedAndTooLarge: return (offset + 512, 0x200_0001)
        }
    }
}

@Suite struct SnapshotEntryCorruptTests {
    static func makeImage(_ damage: SnapshotEntryDamage) throws -> String {
        let dir = try Paths.newScratch("snapentry-\(damage.rawValue)")
        for step in [["qemu-img", "create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
                     ["qemu-io", "-c", "write -P 1 0 64k", "a.qcow2"],
                     ["qemu-img", "snapshot", "-c", "s1", "a.qcow2"],
                     ["qemu-io", "-c", "write -P 2 64k 64k", "a.qcow2"],
                     ["qemu-img", "snapshot", "-c", "s2", "a.qcow2"]] {
            try Runner.qemuStep(step, in: dir)
        }
        let url = URL(fileURLWithPath: dir + "/a.qcow2")
        var d = try Data(contentsOf: url)
        func be(_ at: Int, _ n: Int) -> UInt64 { d[at..<at + n].reduce(0) { $0 << 8 | UInt64($1) } }
        func put(_ v: UInt64, _ at: Int, _ n: Int) {
            for i in 0..<n { d[at + i] = UInt8(truncatingIfNeeded: v >> UInt64(8 * (n - 1 - i))) }
        }
        let table = Int(be(64, 8))
        let (offset, size) = damage.patch(offset: be(table, 8), size: UInt32(be(table + 8, 4)))
        put(offset, table, 8)
        put(UInt64(size), table + 8, 4)
        try d.write(to: url)
        return dir
    }

    @Test(.requiresQEMU, arguments: SnapshotEntryDamage.allCases)
    func readersMatchQEMU(_ damage: SnapshotEntryDamage) throws {
        let dir = try Self.makeImage(damage)
        let commands = [["info"], ["info", "--output=json"], ["map"], ["map", "--output=json"],
                        ["check"], ["check", "--output=json"]]
        for args in commands {
            let (q, m) = try runBoth(args + ["a.qcow2"], cwd: dir)
            let label = args.joined(separator: " ")
            expectSameExit(label, qemu: q, qimg: m)
            expectSameStdout(label, qemu: q, qimg: m)
            // check's diagnostics are printed as they are; the others print none.
            #expect(q.err == m.err, "\(label): stderr\n\(q.err)---\n\(m.err)")
            if args[0] == "check" {
                #expect(q.status == 2)
                if damage != .pastEnd { #expect(m.err.contains("snapshot table entry corrupted"), "\(m.err)") }
            }
        }
    }

    @Test(.requiresQEMU, arguments: SnapshotEntryDamage.allCases)
    func writersRefuse(_ damage: SnapshotEntryDamage) throws {
        let dir = try Self.makeImage(damage)
        let path = dir + "/a.qcow2"
        let before = try FileState(path)
        for args in [["resize", "a.qcow2", "2M"], ["amend", "-o", "lazy_refcounts=on", "a.qcow2"],
                     ["check", "-r", "all", "a.qcow2"], ["io", "-c", "write 0 4k", "a.qcow2"]] {
            let r = try Qimg.run(args, cwd: dir)
            let label = args.joined(separator: " ")
            expectCleanFailure(label, r, exitCode: 1)
            #expect(r.err.contains("snapshot 1 (s1)") && r.err.contains("snapshot table entry corrupted"), "\(label): \(r.err)")
        }
        #expect(try FileState(path) == before, "a refused writer changed the image")
    }

    /// Loading the damaged snapshot fails with qemu-img's message.
    @Test(.requiresQEMU) func measureOfDamagedSnapshotRefused() throws {
        let dir = try Self.makeImage(.unaligned)
        let args = ["measure", "-l", "s1", "-O", "qcow2", "a.qcow2"]
        let (q, m) = try runBoth(args, cwd: dir)
        expectSameExit("measure -l s1", qemu: q, qimg: m)
        #expect(qimgMessages(q.err) == m.err, "stderr\n\(q.err)---\n\(m.err)")
    }
}
