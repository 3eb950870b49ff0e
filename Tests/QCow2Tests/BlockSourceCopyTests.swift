import Foundation
import Testing
import TestSupport
@testable import QCow2

/// The copy of convert and backup (`TargetCopy`, `CopyEngine`) reading from a source in
/// memory (`MemoryBlockSource`): no image file and no QEMU on the source side. What the
/// targets hold is read back through the library and, in one test, judged by qemu-img.
@Suite struct BlockSourceCopyTests {
    static let size: UInt64 = 8 << 20

    /// A source with every kind of run, and the guest bytes it reads as.
    static func makeSource() throws -> (MemoryBlockSource, [UInt8]) {
        var rng = SeededRNG(state: 0x5EA5)
        let source = MemoryBlockSource(size: size)
        var expected = [UInt8](repeating: 0, count: Int(size))
        func data(_ offset: UInt64, _ count: Int) throws {
            // Never zero: every piece of it is data for the zero detection.
            let bytes = (0..<count).map { _ in UInt8.random(in: 1...255, using: &rng) }
            try source.write(bytes, at: offset)
            expected.replaceSubrange(Int(offset)..<Int(offset) + count, with: bytes)
        }
        try data(0, 65536 + 100)                                            // clusters 0 and 1
        try source.writeZeroes(at: 1 << 20, length: 1 << 20)                // recorded zeros
        try source.write([UInt8](repeating: 0, count: 65536), at: 3 << 20)  // data reading as zeros
        try data((5 << 20) + 4096, 10000)                                   // inside one cluster
        try data(size - 700, 700)                                           // up to the end
        return (source, expected)
    }

    /// The ranges holding non-zero bytes, in whole `unit`s.
    static func dataRanges(unit: UInt64) -> [(UInt64, UInt64)] {
        CopyEngine.normalize([(0, 65636), ((5 << 20) + 4096, 10000), (size - 700, 700)], unit: unit, size: size)
    }

    /// Creates `path` and copies `source` into it with convert's copy; returns the bytes
    /// of data written (the target is closed, and its locks released, on return).
    @discardableResult
    static func copy(_ source: any BlockSource, to path: String, format: ImageFormat, compressed: Bool = false) throws -> UInt64 {
        var c = CreateOptions()
        c.format = format
        c.size = source.virtualSize
        try ImageCreator.create(path, options: c)
        var settings = CopySettings()
        settings.compressed = compressed
        var copy = try TargetCopy(source: source, work: path, format: format, targetBacking: nil, settings: settings)
        let ranges = CopyEngine.normalize(try CopyEngine.nonZeroRanges(source), unit: copy.unit, size: source.virtualSize)
        try copy.run(Plan(data: ranges, zero: []), maskZeros: false, progress: nil)
        try copy.finish()
        return copy.engine.bytesCopied
    }

    static func expectSameBytes(_ image: any DiskImage, _ expected: [UInt8], _ label: String) throws {
        #expect(image.virtualSize == UInt64(expected.count), "\(label): size")
        let got = try image.read(count: expected.count, at: 0)
        guard got != expected else { return }
        if let i = got.indices.first(where: { got[$0] != expected[$0] }) {
            Issue.record("\(label): first difference at guest offset \(i): \(got[i]), expected \(expected[i])")
        }
    }

    static func pairs(_ r: [(UInt64, UInt64)]) -> [[UInt64]] { r.map { [$0.0, $0.1] } }

    @Test func memorySourceReportsItsRuns() throws {
        let (source, expected) = try Self.makeSource()
        func kind(_ at: UInt64) throws -> SourceExtent { try source.extent(at: at, maxLength: Self.size) }
        #expect(try kind(0) == SourceExtent(.data, length: 65636))
        #expect(try kind(65636) == SourceExtent(.unallocated, length: (1 << 20) - 65636))
        #expect(try kind(1 << 20) == SourceExtent(.zero, length: 1 << 20))
        #expect(try kind(3 << 20) == SourceExtent(.data, length: 65536))
        #expect(try source.extent(at: (5 << 20) + 4096, maxLength: 100) == SourceExtent(.data, length: 100))
        #expect(try kind(Self.size - 700) == SourceExtent(.data, length: 700))
        #expect(throws: QCow2Error.self) { try source.extent(at: Self.size, maxLength: 1) }
        #expect(throws: QCow2Error.self) { try source.write([1], at: Self.size) }
        #expect(try source.read(count: Int(Self.size), at: 0) == expected)
        // Data anywhere may be non-zero; recorded zeros and unallocated ranges are not.
        #expect(Self.pairs(try CopyEngine.nonZeroRanges(source))
                == [[0, 65636], [3 << 20, 65536], [(5 << 20) + 4096, 10000], [Self.size - 700, 700]])
        // Overwrites split runs: zeros over the middle of data, a discard over recorded zeros.
        try source.writeZeroes(at: 1000, length: 1000)
        try source.discard(at: (1 << 20) + 4096, length: 4096)
        #expect(try kind(0) == SourceExtent(.data, length: 1000))
        #expect(try kind(1000) == SourceExtent(.zero, length: 1000))
        #expect(try kind(2000) == SourceExtent(.data, length: 65636 - 2000))
        #expect(try kind(1 << 20) == SourceExtent(.zero, length: 4096))
        #expect(try kind((1 << 20) + 4096) == SourceExtent(.unallocated, length: 4096))
        #expect(try source.read(count: 3000, at: 0) == Array(expected[0..<1000]) + [UInt8](repeating: 0, count: 1000) + Array(expected[2000..<3000]))
    }

    @Test(arguments: [false, true])
    func copyIntoQCow2(compressed: Bool) throws {
        let (source, expected) = try Self.makeSource()
        let dir = try Paths.newScratch("memcopy-qcow2")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let copied = try Self.copy(source, to: dir + "/t.qcow2", format: .qcow2, compressed: compressed)
        #expect(copied == 4 * 65536, "the clusters holding non-zero bytes, nothing else")
        let target = try ImageOpener().open(dir + "/t.qcow2", format: .qcow2)
        try Self.expectSameBytes(target, expected, "qcow2 target (compressed: \(compressed))")
        // Clusters only where the source had non-zero bytes: its zeros stay unallocated.
        #expect(Self.pairs(try CopyEngine.nonZeroRanges(target)) == Self.pairs(Self.dataRanges(unit: 65536)))
        var kinds: [ExtentKind] = []
        try target.forEachExtent(from: 0, to: target.virtualSize) { _, e in kinds.append(e.kind) }
        #expect(!kinds.contains(.zero), "a new image without a backing file: zero runs are unallocated")
    }

    @Test func copyIntoRaw() throws {
        let (source, expected) = try Self.makeSource()
        let dir = try Paths.newScratch("memcopy-raw")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.copy(source, to: dir + "/t.raw", format: .raw)
        let target = try ImageOpener().open(dir + "/t.raw", format: .raw)
        try Self.expectSameBytes(target, expected, "raw target")
        // A raw target is written in aligned 4 KiB pieces (-S 4k): the rest stays holes.
        #expect(Self.pairs(try CopyEngine.nonZeroRanges(target)) == Self.pairs(Self.dataRanges(unit: 4096)))
    }

    @Test(.requiresQEMU) func qemuImgAgreesWithTheCopy() throws {
        let (source, expected) = try Self.makeSource()
        let dir = try Paths.newScratch("memcopy-qemu")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Self.copy(source, to: dir + "/t.qcow2", format: .qcow2)
        try expectCheckClean("t.qcow2", dir, "copy from memory")
        try Data(expected).write(to: URL(fileURLWithPath: dir + "/expected.raw"))
        let cmp = try Runner.qemuImg(["compare", "-f", "raw", "-F", "qcow2", "expected.raw", "t.qcow2"], cwd: dir)
        #expect(cmp.status == 0 && cmp.out == "Images are identical.\n", "\(cmp.summary): \(cmp.out)\(cmp.err)")
        // qemu-img's own map: data exactly where the source had non-zero bytes.
        let map = try Runner.qemuImg(["map", "--output=json", "t.qcow2"], cwd: dir)
        try #require(map.status == 0, "\(map.summary): \(map.err)")
        let entries = try #require(try JSONSerialization.jsonObject(with: map.stdout) as? [[String: Any]])
        let data = entries.filter { $0["data"] as? Bool == true }.map { [($0["start"] as? NSNumber)?.uint64Value ?? 0, ($0["length"] as? NSNumber)?.uint64Value ?? 0] }
        #expect(data == Self.pairs(Self.dataRanges(unit: 65536)), "qemu-img map: \(map.out)")
    }

    /// A source that notes how far each read runs ahead of what the copy has written.
    final class LeadRecorder: BlockSource {
        let inner: MemoryBlockSource
        var written: UInt64 = 0
        var maxLead: UInt64 = 0
        var path: String { inner.path }
        var virtualSize: UInt64 { inner.virtualSize }
        init(_ inner: MemoryBlockSource) { self.inner = inner }
        func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
            maxLead = max(maxLead, offset - min(offset, written))
            try inner.read(into: buffer, at: offset)
        }
        func extent(at offset: UInt64, maxLength: UInt64) throws -> SourceExtent { try inner.extent(at: offset, maxLength: maxLength) }
    }

    /// Compressed copies (issue 16, item 4) read the next chunks while earlier ones are
    /// being compressed: reads run at least two chunks ahead of the writes; and what is
    /// written is still the source, in order.
    @Test func compressedCopyReadsAheadOfItsWrites() throws {
        let chunk = UInt64(try CompressionPipeline(type: .zlib, clusterSize: 65536, detectZeros: true, path: "t").chunkBytes)
        let memory = MemoryBlockSource(size: 6 * chunk)
        let bytes = (0..<Int(6 * chunk)).map { UInt8(truncatingIfNeeded: $0 % 251 + $0 / 65536 + 1) }
        try memory.write(bytes, at: 0)
        let source = LeadRecorder(memory)
        let dir = try Paths.newScratch("memcopy-lead")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var c = CreateOptions()
        c.size = source.virtualSize
        try ImageCreator.create(dir + "/t.qcow2", options: c)
        var settings = CopySettings()
        settings.compressed = true
        do {  // the target is closed, and its locks released, at the end of the scope
            var copy = try TargetCopy(source: source, work: dir + "/t.qcow2", format: .qcow2, targetBacking: nil, settings: settings)
            try copy.run(Plan(data: [(0, source.virtualSize)], zero: []), maskZeros: false) { done, _ in source.written = done }
            try copy.finish()
        }
        #expect(source.written == source.virtualSize)
        #expect(source.maxLead >= 2 * chunk, "reads ran at most \(source.maxLead) bytes ahead of the writes")
        try Self.expectSameBytes(try ImageOpener().open(dir + "/t.qcow2", format: .qcow2), bytes, "compressed copy")
    }
}

#if QIMG_FAULT_INJECTION
extension BlockSourceCopyTests {
    /// A compressed copy writes the streams of consecutive clusters with one transaction
    /// per L2 table in each chunk (refcounts committed once, the streams packed one after
    /// the other in one write, the L2 entries in one write), not one per cluster; with
    /// 512-byte clusters a chunk spans many L2 tables. qemu-img reads the source back and
    /// finds nothing to fix. (The writes are counted by a fault injector with no fault.)
    @Test(.requiresQEMU, arguments: [512, 4096, 65536])
    func compressedCopyWritesRunsOfClustersTogether(_ clusterSize: Int) throws {
        let size = 8 << 20
        let memory = MemoryBlockSource(size: UInt64(size))
        // Compressible, never zero, different in every cluster of every size.
        let bytes = (0..<size).map { UInt8(truncatingIfNeeded: ($0 / 7) % 13 + ($0 / 512) * 3 + 1) | 1 }
        try memory.write(bytes, at: 0)
        let dir = try Paths.newScratch("memcopy-compressed-runs")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var c = CreateOptions()
        c.size = memory.virtualSize
        c.clusterSize = clusterSize
        try ImageCreator.create(dir + "/t.qcow2", options: c)
        var settings = CopySettings()
        settings.compressed = true
        let counter = FaultInjector(FaultPlan(pathPrefix: dir + "/"))
        try counter.scope {
            var copy = try TargetCopy(source: memory, work: dir + "/t.qcow2", format: .qcow2, targetBacking: nil, settings: settings)
            try copy.run(Plan(data: [(0, memory.virtualSize)], zero: []), maskZeros: false, progress: nil)
            try copy.finish()
        }
        let clusters = size / clusterSize
        // One transaction per cluster made 3 writes per cluster (its refcount, its stream,
        // its L2 entry); a chunk of 8 or more clusters now makes about 3 in all.
        #expect(counter.writes * 2 <= clusters, "\(clusterSize): \(counter.writes) writes for \(clusters) compressed clusters")
        try Self.expectSameBytes(try ImageOpener().open(dir + "/t.qcow2", format: .qcow2), bytes, "compressed copy, cluster size \(clusterSize)")
        try expectCheckClean("t.qcow2", dir, "compressed copy, cluster size \(clusterSize)")
        let check = try Runner.qemuImg(["check", "--output=json", "t.qcow2"], cwd: dir)
        #expect(check.out.contains("\"compressed-clusters\": \(clusters)"), "\(clusterSize): \(check.out)")
    }
}
#endif
