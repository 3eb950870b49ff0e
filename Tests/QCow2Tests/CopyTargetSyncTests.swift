import Foundation
import Testing
import TestSupport
@testable import QCow2

// Syncs are counted by the fault injector, which exists in debug builds only.
#if QIMG_FAULT_INJECTION
/// A convert or backup target is made durable as a whole at the end (one fsync; none
/// with `-t unsafe`), not step by step while it is created: it is under a temporary name
/// that nothing uses before it is complete, and a crash leaves only a file the next run
/// removes. Each barrier of the creation was a journal commit on the target's file system.
@Suite struct CopyTargetSyncTests {
    /// A 4 MiB qcow2 source in `dir` with three clusters of data.
    static func makeSource(_ dir: String) throws -> String {
        let path = dir + "/src.qcow2"
        var c = CreateOptions()
        c.format = .qcow2
        c.size = 4 << 20
        try ImageCreator.create(path, options: c)
        var opener = ImageOpener()
        opener.writable = true
        guard let q = try opener.open(path, format: .qcow2) as? QCow2Image else { throw TestFailure("\(path): not qcow2") }
        try q.write([UInt8](repeating: 0x5a, count: 3 << 16), at: 1 << 20)
        try q.close()
        return path
    }

    /// Directories `in` (the source) and `out` (the targets) under a new scratch directory.
    static func directories(_ name: String) throws -> (input: String, output: String) {
        let root = try Paths.newScratch(name)
        for d in ["in", "out"] { try FileManager.default.createDirectory(atPath: root + "/" + d, withIntermediateDirectories: true) }
        return (root + "/in", root + "/out")
    }

    /// The syncs (fsync, fdatasync) of files in `dir` while `body` runs.
    static func syncs(in dir: String, _ body: () throws -> Void) throws -> Int {
        let counter = FaultInjector(FaultPlan(pathPrefix: dir + "/"))
        try counter.scope(body)
        return counter.syncs
    }

    static func expectSameGuestBytes(_ target: String, _ format: ImageFormat, as source: String) throws {
        let t = try ImageOpener().open(target, format: format)
        let s = try ImageOpener().open(source, format: .qcow2)
        #expect(t.virtualSize == s.virtualSize)
        #expect(try t.read(count: Int(s.virtualSize), at: 0) == s.read(count: Int(s.virtualSize), at: 0), "\(target)")
    }

    @Test(arguments: [ImageFormat.qcow2, .raw], [true, false])
    func convertSyncsOnlyTheFinishedTarget(format: ImageFormat, durable: Bool) throws {
        let (input, output) = try Self.directories("copy-target-sync-convert")
        let src = try Self.makeSource(input)
        let source = try ImageOpener().open(src, format: .qcow2)
        var o = ConvertOptions()
        o.create.format = format
        o.durable = durable
        let target = output + "/t.img"
        let n = try Self.syncs(in: output) { try ConvertOperation.run(source: source, target: target, options: o) }
        #expect(n == (durable ? 1 : 0), "convert -O \(format) durable=\(durable): \(n) syncs of the target")
        try Self.expectSameGuestBytes(target, format, as: src)
    }

    @Test
    func fullBackupSyncsOnlyTheFinishedTarget() throws {
        let (input, output) = try Self.directories("copy-target-sync-backup")
        let src = try Self.makeSource(input)
        let target = output + "/b.qcow2"
        let n = try Self.syncs(in: output) { _ = try BackupOperation.run(source: src, target: target, options: BackupOptions()) }
        #expect(n == 1, "backup --sync=full: \(n) syncs of the target")
        try Self.expectSameGuestBytes(target, .qcow2, as: src)
    }
}
#endif
