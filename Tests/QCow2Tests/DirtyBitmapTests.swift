import Testing
import TestSupport
@testable import QCow2

/// The in-memory bitmap at word and chunk boundaries, against a plain Bool array model.
@Suite struct DirtyBitmapTests {
    static let edges: [UInt64] = [0, 1, 63, 64, 65, 127, 128, 129, (1 << 18) - 1, 1 << 18, (1 << 18) + 1, 999_999]

    static func extents(_ model: [Bool], granularity: UInt64, size: UInt64) -> [[UInt64]] {
        var out: [[UInt64]] = []
        var i = 0
        while i < model.count {
            guard model[i] else { i += 1; continue }
            let s = i
            while i < model.count && model[i] { i += 1 }
            out.append([UInt64(s) * granularity, min(size, UInt64(i) * granularity) - UInt64(s) * granularity])
        }
        return out
    }

    static func extents(_ b: DirtyBitmap) -> [[UInt64]] {
        var out: [[UInt64]] = []
        b.forEachDirtyExtent { out.append([$0, $1]) }
        return out
    }

    @Test(arguments: edges) func setAndResetAtBoundaries(_ first: UInt64) {
        let size: UInt64 = 1_000_000 * 512 + 100  // a partial last granule
        var b = DirtyBitmap(granularity: 512, size: size)
        var model = [Bool](repeating: false, count: Int(b.bitCount))
        for len: UInt64 in [1, 2, 64, 65, 300] where first + len <= b.bitCount {
            b.setBits(first, first + len, to: true)
            for i in first..<(first + len) { model[Int(i)] = true }
            #expect(Self.extents(b) == Self.extents(model, granularity: 512, size: size))
            #expect(b.dirtyBitCount == UInt64(model.filter { $0 }.count))
        }
        b.reset(first * 512 + 1, 64 * 512)
        for i in first..<min(first + 65, b.bitCount) { model[Int(i)] = false }
        #expect(Self.extents(b) == Self.extents(model, granularity: 512, size: size))
        #expect(b.bit(b.bitCount - 1) == model.last!)
    }

    @Test func byteRangesMapToGranules() {
        var b = DirtyBitmap(granularity: 65536, size: 1 << 30)
        b.set(1 << 20, 4096)                // a partial granule still dirties all of it
        b.set(100 << 20, 128 << 10)
        b.set((1 << 30) - 1, 1)
        #expect(Self.extents(b) == [[1 << 20, 65536], [100 << 20, 131072], [(1 << 30) - 65536, 65536]])
        #expect(b.dirtyBytes == 4 * 65536)
        #expect(b.test(1 << 20) && !b.test((1 << 20) + 65536))
        b.set(1 << 31, 100)                 // past the end: ignored
        #expect(b.dirtyBitCount == 4)
    }

    /// The on-disk layout: bit n is bit n%8 of byte n/8 (the fact sheet's worked example).
    @Test func serializationMatchesQemuLayout() {
        var b = DirtyBitmap(granularity: 65536, size: 1 << 30)
        b.set(0, 65536); b.set(1 << 20, 4096); b.set(100 << 20, 128 << 10); b.set(1023 << 20, 65536)
        let bytes = b.bytes(atByte: 0, count: 65536)!
        #expect(bytes[0] == 0x01 && bytes[2] == 0x01 && bytes[200] == 0x03 && bytes[2046] == 0x01)
        #expect(bytes.enumerated().filter { $0.element != 0 }.count == 4)
        var c = DirtyBitmap(granularity: 65536, size: 1 << 30)
        bytes.withUnsafeBytes { c.load(bytes: $0, atByte: 0) }
        #expect(c == b)
        #expect(b.bytes(atByte: 65536, count: 65536) == nil)
    }

    @Test func tailBitsPastTheDiskAreIgnoredOnLoad() {
        var b = DirtyBitmap(granularity: 512, size: 1000)  // 2 bits
        let bytes: [UInt8] = [0xFF, 0, 0, 0, 0, 0, 0, 0]
        bytes.withUnsafeBytes { b.load(bytes: $0, atByte: 0) }
        #expect(b.dirtyBitCount == 2)
        #expect(Self.extents(b) == [[0, 1000]])
    }

    @Test func mergeAcrossGranularities() {
        var fine = DirtyBitmap(granularity: 512, size: 4 << 20)
        fine.set(70_000, 10)
        var coarse = DirtyBitmap(granularity: 65536, size: 4 << 20)
        coarse.merge(fine)
        #expect(Self.extents(coarse) == [[65536, 65536]])
        var fine2 = DirtyBitmap(granularity: 512, size: 4 << 20)
        fine2.merge(coarse)
        #expect(Self.extents(fine2) == [[65536, 65536]])
        var same = DirtyBitmap(granularity: 512, size: 4 << 20)
        same.set(0, 512)
        same.merge(fine)
        #expect(Self.extents(same) == [[0, 512], [69_632, 512]])
    }

    @Test func shrinkDropsTailBits() {
        var b = DirtyBitmap(granularity: 512, size: 1 << 30)
        b.set(0, 1 << 30)
        b.resize(1000)
        #expect(b.bitCount == 2 && b.dirtyBitCount == 2)
        #expect(b.bytes(atByte: 0, count: 8) == [0x03, 0, 0, 0, 0, 0, 0, 0])
    }

    /// A 4 TiB disk at 64 KiB granularity with sparse dirt: memory follows the dirty chunks.
    @Test func hugeSparseBitmapIsCheap() {
        var b = DirtyBitmap(granularity: 65536, size: 4 << 40)
        for i: UInt64 in 0..<100 { b.set(i * (40 << 30), 1 << 20) }
        #expect(b.dirtyBytes == 100 << 20)
        var n = 0
        b.forEachDirtyExtent { _, _ in n += 1 }
        #expect(n == 100)
    }
}
