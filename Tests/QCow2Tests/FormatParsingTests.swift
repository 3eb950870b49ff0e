import Testing
import TestSupport
@testable import QCow2

/// Byte-level tests of the pure parsers against bytes taken from real QEMU images
/// (the annotated examples of the qcow2 fact sheet).
@Suite struct FormatParsingTests {
    /// Header of a 1 GiB image with 64 KiB clusters and one bitmap, as qemu-img 7.2 wrote it.
    static let header: [UInt8] = {
        var b = [UInt8](repeating: 0, count: 0x220)
        let words: [(Int, [UInt8])] = [
            (0x00, [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]),
            (0x14, [0, 0, 0, 0x10, 0, 0, 0, 0, 0x40, 0, 0, 0]),
            (0x24, [0, 0, 0, 2, 0, 0, 0, 0, 0, 3, 0, 0]),
            (0x30, [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1]),
            (0x58, [0, 0, 0, 0, 0, 0, 0, 1]),
            (0x60, [0, 0, 0, 4, 0, 0, 0, 0x70]),
            (0x70, [0x23, 0x85, 0x28, 0x75, 0, 0, 0, 0x18]),
            (0x78, [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0x0f, 0, 0]),
        ]
        for (o, bytes) in words { b.replaceSubrange(o..<(o + bytes.count), with: bytes) }
        return b
    }()

    @Test func parsesRealHeader() throws {
        let h = try Header(parsing: ByteReader(Self.header))
        #expect(h.version == 3)
        #expect(h.clusterBits == 16)
        #expect(h.size == 0x4000_0000)
        #expect(h.l1Size == 2)
        #expect(h.l1TableOffset == 0x30000)
        #expect(h.refcountTableOffset == 0x10000)
        #expect(h.refcountTableClusters == 1)
        #expect(h.autoclearFeatures == 1)
        #expect(h.refcountOrder == 4)
        #expect(h.headerLength == 0x70)
        #expect(h.compressionType == 0)
        let exts = try HeaderExtension.parseList(ByteReader(Self.header), start: h.length, end: 0x220)
        #expect(exts == [.bitmaps(BitmapsExtension(nbBitmaps: 1, reserved: 0, directorySize: 32, directoryOffset: 0xf0000))])
    }

    @Test func headerRoundTrips() throws {
        let h = try Header(parsing: ByteReader(Self.header))
        var out: [UInt8] = []
        h.serialize(into: &out)
        #expect(out == Array(Self.header[0..<0x70]))
    }

    /// A refcount structure switched by amend (another width): one write carrying the
    /// table's offset and size and refcount_order, with the fields between as they are,
    /// at their places in qemu-img's header.
    @Test func refcountStructureFieldMatchesTheHeader() throws {
        var h = try Header(parsing: ByteReader(Self.header))
        h.refcountTableOffset = 0x1234_0000
        h.refcountTableClusters = 3
        h.refcountOrder = 6
        var whole: [UInt8] = []
        h.serialize(into: &whole)
        let (offset, bytes) = HeaderField.refcountStructure.encoded(h)
        #expect(offset == 48 && bytes.count == 52)
        #expect(bytes == Array(whole[48..<100]))
        var patched = Self.header
        HeaderField.patch(&patched, [.refcountStructure], of: h)
        let back = try Header(parsing: ByteReader(patched))
        #expect(back.refcountTableOffset == 0x1234_0000 && back.refcountTableClusters == 3 && back.refcountOrder == 6)
        #expect(back.autoclearFeatures == 1 && back.nbSnapshots == 0 && back.headerLength == 0x70)
    }

    @Test func rejectsBadHeaders() {
        var b = Self.header
        b[7] = 4
        #expect(throws: FormatError.self) { try Header(parsing: ByteReader(b)) }
        b = Self.header
        b[0] = 0
        #expect(throws: FormatError.self) { try Header(parsing: ByteReader(b)) }
        b = Self.header
        b[0x67] = 100  // header_length 100
        #expect(throws: FormatError.self) { try Header(parsing: ByteReader(b)) }
        #expect(throws: FormatError.self) { try Header(parsing: ByteReader(Array(Self.header[0..<50]))) }
    }

    @Test func extensionRunningPastTheEndIsRejected() {
        var b = Self.header
        b[0x76] = 0x10  // bitmaps extension length 0x1018
        #expect(throws: FormatError.self) { try HeaderExtension.parseList(ByteReader(b), start: 0x70, end: 0x220) }
    }

    @Test func geometryLimits() throws {
        #expect(throws: FormatError.self) { try Geometry(clusterBits: 8, extendedL2: false, refcountOrder: 4) }
        #expect(throws: FormatError.self) { try Geometry(clusterBits: 22, extendedL2: false, refcountOrder: 4) }
        #expect(throws: FormatError.self) { try Geometry(clusterBits: 13, extendedL2: true, refcountOrder: 4) }
        #expect(throws: FormatError.self) { try Geometry(clusterBits: 16, extendedL2: false, refcountOrder: 7) }
        let g = try Geometry(clusterBits: 16, extendedL2: false, refcountOrder: 4)
        #expect(g.l2Entries == 8192)
        #expect(g.l1EntriesNeeded(size: 1 << 30) == 2)
        #expect(g.l1Index(0x3FF0_0000) == 1)
        #expect(g.l2Index(0x3FF0_0000) == 8176)
        let x = try Geometry(clusterBits: 16, extendedL2: true, refcountOrder: 4)
        #expect(x.l1EntriesNeeded(size: 1 << 30) == 4)
        let small = try Geometry(clusterBits: 9, extendedL2: false, refcountOrder: 4)
        #expect(small.l1EntriesNeeded(size: 64 << 20) == 2048)
    }

    /// Compressed descriptors observed in qemu-img convert -c output (64 KiB clusters).
    @Test func compressedDescriptors() throws {
        let g = try Geometry(clusterBits: 16, extendedL2: false, refcountOrder: 4)
        let cases: [(UInt64, UInt64, Int)] = [
            (0x4140_0000_0005_0000, 0x50000, 3072),
            (0x4000_0000_0005_0B68, 0x50B68, 152),
            (0x40C0_0000_0005_0BB7, 0x50BB7, 1609),
        ]
        for (raw, off, len) in cases {
            #expect(try L2Entry(raw).descriptor(geometry: g, subcluster: 0) == .compressed(offset: off, length: len))
        }
        let g512 = try Geometry(clusterBits: 9, extendedL2: false, refcountOrder: 4)
        #expect(L2Entry(0x4000_0000_0000_4850).compressedFields(clusterBits: g512.clusterBits) == (0x4850, 0))
        let g2m = try Geometry(clusterBits: 21, extendedL2: false, refcountOrder: 4)
        let f = L2Entry(0x4E10_0000_00A0_0000).compressedFields(clusterBits: g2m.clusterBits)
        #expect(f.offset == 0xA00000 && f.sectors == 1800)
    }

    @Test func standardAndExtendedEntries() throws {
        let g = try Geometry(clusterBits: 16, extendedL2: false, refcountOrder: 4)
        #expect(try L2Entry(0x8000_0000_0005_0000).descriptor(geometry: g, subcluster: 0) == .normal(host: 0x50000))
        #expect(try L2Entry(1).descriptor(geometry: g, subcluster: 0) == .zero(host: nil))
        #expect(try L2Entry(0x8000_0000_0006_0001).descriptor(geometry: g, subcluster: 0) == .zero(host: 0x60000))
        #expect(try L2Entry(0).descriptor(geometry: g, subcluster: 0) == .unallocated(host: nil))
        #expect(throws: FormatError.self) { try L2Entry(0x8000_0000_0007_0200).descriptor(geometry: g, subcluster: 0) }
        // Extended L2 bytes observed after qemu-io writes (64 KiB clusters, 2 KiB subclusters).
        let x = try Geometry(clusterBits: 16, extendedL2: true, refcountOrder: 4)
        let e = L2Entry(0x8000_0000_0005_0000, bitmap: 0x8000_0003)
        #expect(try e.descriptor(geometry: x, subcluster: 0) == .normal(host: 0x50000))
        #expect(try e.descriptor(geometry: x, subcluster: 1) == .normal(host: 0x50800))
        #expect(try e.descriptor(geometry: x, subcluster: 2) == .unallocated(host: 0x51000))
        #expect(try e.descriptor(geometry: x, subcluster: 31) == .normal(host: 0x5F800))
        let z = L2Entry(0, bitmap: 0x0000_0030 << 32)
        #expect(try z.descriptor(geometry: x, subcluster: 4) == .zero(host: nil))
        #expect(try z.descriptor(geometry: x, subcluster: 3) == .unallocated(host: nil))
        #expect(throws: FormatError.self) { try L2Entry(0x8000_0000_0005_0000, bitmap: 0x1_0000_0001).descriptor(geometry: x, subcluster: 0) }
        #expect(throws: FormatError.self) { try L2Entry(0, bitmap: 1).descriptor(geometry: x, subcluster: 0) }
    }

    /// Refcount block encodings observed at the start of real refcount blocks.
    @Test func refcountEntryEncodings() {
        #expect((0..<8).map { RefcountReader.entry([0xff], $0, order: 0) } == [1, 1, 1, 1, 1, 1, 1, 1])
        #expect((0..<12).map { RefcountReader.entry([0x55, 0xaa, 0x05], $0, order: 1) } == [1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 0, 0])
        #expect((0..<10).map { RefcountReader.entry([0x11, 0x11, 0x22, 0x22, 0x11], $0, order: 2) } == [1, 1, 1, 1, 2, 2, 2, 2, 1, 1])
        #expect(RefcountReader.entry([0, 1, 0, 2], 1, order: 4) == 2)
        #expect(RefcountReader.entry([0, 0, 0, 0, 0, 0, 0, 7], 1, order: 5) == 7)
        #expect(RefcountReader.entry([0, 0, 0, 0, 0, 0, 1, 0], 0, order: 6) == 256)
    }

    @Test func bitmapTableSizeFormula() {
        // Observed table sizes: 1 GiB at 64K -> 1; 64 GiB at 512 B -> 256; 64 GiB at 64K -> 2; 4 TiB at 4K -> 2048.
        #expect(BitmapDirectoryEntry.tableSize(diskSize: 1 << 30, granularityBits: 16, clusterSize: 65536) == 1)
        #expect(BitmapDirectoryEntry.tableSize(diskSize: 64 << 30, granularityBits: 9, clusterSize: 65536) == 256)
        #expect(BitmapDirectoryEntry.tableSize(diskSize: 64 << 30, granularityBits: 16, clusterSize: 65536) == 2)
        #expect(BitmapDirectoryEntry.tableSize(diskSize: 4 << 40, granularityBits: 12, clusterSize: 65536) == 2048)
    }

    @Test func bitmapDirectoryEntry() throws {
        // Entry for bitmap "b0": table at 0xe0000, 1 entry, auto, type 1, granularity 16.
        let bytes: [UInt8] = [0, 0, 0, 0, 0, 0x0e, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 1, 0x10, 0, 2, 0, 0, 0, 0,
                              0x62, 0x30, 0, 0, 0, 0, 0, 0]
        let (e, size) = try BitmapDirectoryEntry.parse(ByteReader(bytes), at: 0)
        #expect(size == 32)
        #expect(e.tableOffset == 0xe0000 && e.tableSize == 1 && e.isAuto && !e.inUse)
        #expect(e.granularity == 65536 && e.name == "b0" && e.type == 1)
        #expect(throws: FormatError.self) { try BitmapDirectoryEntry.parse(ByteReader(Array(bytes[0..<25])), at: 0) }
    }
}
