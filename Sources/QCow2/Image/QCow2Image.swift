/// A qcow2 image opened for reading: header, extensions, L1 table, snapshot
/// table and bitmap directory validated at open; L2 tables through a capped cache.
public final class QCow2Image: DiskImage {
    public let path: String
    public let file: BlockFile
    public internal(set) var header: Header
    public let geometry: Geometry
    public internal(set) var extensions: [HeaderExtension]
    /// The backing file name as stored in the image.
    public internal(set) var backingFileName: String?
    /// The backing format from the header extension, if any.
    public let backingFormat: String?
    public internal(set) var backing: (any DiskImage)?
    /// The external data file (QCow2Image+Protection.swift), when the image has one.
    public internal(set) var dataFile: BlockFile?
    public internal(set) var l1Table: [UInt64]
    public internal(set) var snapshots: [SnapshotEntry]
    /// The bitmaps extension as stored (nil when absent).
    public internal(set) var bitmapsExtension: BitmapsExtension?
    /// Bitmaps QEMU would load: empty when the autoclear bit says they are stale.
    public internal(set) var bitmaps: [BitmapDirectoryEntry]
    public let featureNames: [FeatureName]
    /// Why the bitmaps could not be loaded (only with `tolerateBrokenBitmaps`).
    public internal(set) var bitmapsError: QCow2Error?
    public let compressionType: CompressionType
    /// Length of the host file when opened.
    public internal(set) var fileSize: UInt64

    public var formatName: String { "qcow2" }
    /// The disk size in whole 512-byte sectors, as QEMU sees it.
    public var virtualSize: UInt64 { header.size & ~UInt64(511) }

    let l2Cache: TableCache
    /// Set when the image is open for writing.
    var allocator: Allocator?
    /// Writes already prepared the image (bitmaps, autoclear bits, dirty bit).
    var preparedForWrites = false
    /// Where the next compressed stream may go: a host cluster and the bytes used in it.
    var compressedPacking: (host: UInt64, used: UInt64)?
    /// Enabled bitmaps kept in step with guest writes during this session (by name).
    var trackedBitmaps: [String: DirtyBitmap] = [:]
    var decompressedCluster: [UInt8] = []
    var decompressedKey: UInt64 = .max
    var compressedInput: [UInt8] = []

    /// Default byte cap of the L2 cache.
    public static let defaultCacheBytes = 32 * 1024 * 1024

    /// `tolerateBrokenBitmaps`: open even when the bitmaps extension or directory is invalid
    /// (which QEMU refuses); the problem is kept in `bitmapsError` for check and repair.
    public init(path: String, file: BlockFile, cacheBytes: Int = QCow2Image.defaultCacheBytes, tolerateBrokenBitmaps: Bool = false) throws {
        self.path = path
        self.file = file
        let fileSize = try file.size()
        self.fileSize = fileSize
        func bad(_ e: FormatError) -> QCow2Error { e.at(path) }

        guard fileSize >= UInt64(Header.v2Length) else {
            throw QCow2Error.malformed(path: path, field: "", detail: "qcow2 header too short (the file has \(fileSize) bytes)")
        }
        // The cluster size first (the header may be longer than 512 bytes), then
        // the whole header cluster.
        let first = try file.read(count: 512, at: 0)
        do { try Header.checkMagicAndVersion(ByteReader(first)) } catch { throw bad(error) }
        let cb = Int((try? ByteReader(first).u32(20, "cluster_bits")) ?? 0)
        guard (Geometry.minClusterBits...Geometry.maxClusterBits).contains(cb) else {
            throw bad(FormatError("cluster_bits", "\(cb) is out of range (cluster size must be 512 B .. 2 MiB)"))
        }
        let cluster0 = try file.read(count: 1 << cb, at: 0)
        let h: Header
        do { h = try Header(parsing: ByteReader(cluster0)) } catch { throw bad(error) }
        let g: Geometry
        do {
            g = try Geometry(clusterBits: cb, extendedL2: h.hasExtendedL2, refcountOrder: Int(h.refcountOrder))
        } catch { throw bad(error) }
        self.geometry = g
        guard UInt64(h.length) <= fileSize else {
            throw QCow2Error.malformed(path: path, field: "", detail: "qcow2 header too short (header_length \(h.length), the file has \(fileSize) bytes)")
        }
        self.header = h

        // Extensions end where the backing file name starts, or at the end of cluster 0.
        var extEnd = g.clusterSize
        if h.backingFileOffset != 0 {
            guard h.backingFileOffset <= UInt64(g.clusterSize) else {
                throw QCow2Error.malformed(path: path, field: "backing_file_offset",
                                 detail: "0x\(hex(h.backingFileOffset)) lies outside the header cluster")
            }
            extEnd = Int(h.backingFileOffset)
        }
        let exts: [HeaderExtension]
        do { exts = try HeaderExtension.parseList(ByteReader(cluster0), start: h.length, end: extEnd) } catch { throw bad(error) }
        self.extensions = exts
        var names: [FeatureName] = []
        var bfmt: String?
        var bext: BitmapsExtension?
        for e in exts {
            switch e {
            case .featureNameTable(let n): names += n
            case .backingFormat(let f): bfmt = f
            case .bitmaps(let b): bext = b
            default: break
            }
        }
        self.featureNames = names
        self.backingFormat = bfmt

        // Feature bits.
        let unknown = h.incompatibleFeatures & ~Features.knownIncompatible
        if unknown != 0 {
            let parts = (0..<64).filter { unknown & (1 << UInt64($0)) != 0 }.map { bit -> String in
                if let n = names.first(where: { $0.type == 0 && Int($0.bit) == bit }), !n.name.isEmpty {
                    return "\(n.name) (bit \(bit))"
                }
                return "unknown incompatible feature bit \(bit)"
            }
            throw QCow2Error.unsupported(path: path, detail: "unsupported qcow2 feature(s): " + parts.joined(separator: ", "))
        }
        try Self.validateProtection(header: h, extensions: exts, path: path, clusterSize: g.clusterSize, fileSize: fileSize)
        if h.version >= 3 && h.headerLength > 104 {
            guard let ct = CompressionType(rawValue: h.compressionType) else {
                throw QCow2Error.malformed(path: path, field: "compression_type", detail: "unknown compression type \(h.compressionType)")
            }
            if ct == .zstd && h.incompatibleFeatures & Features.compressionType == 0 {
                throw QCow2Error.malformed(path: path, field: "compression_type",
                                 detail: "zstd is set but the compression type feature bit is not")
            }
            if ct == .zlib && h.incompatibleFeatures & Features.compressionType != 0 {
                throw QCow2Error.malformed(path: path, field: "compression_type",
                                 detail: "the compression type feature bit is set for zlib")
            }
            self.compressionType = ct
        } else {
            if h.incompatibleFeatures & Features.compressionType != 0 {
                throw QCow2Error.malformed(path: path, field: "compression_type",
                                 detail: "the compression type feature bit is set but the header has no compression type field")
            }
            self.compressionType = .zlib
        }

        // Backing file name.
        if h.backingFileOffset != 0 {
            guard h.backingFileSize <= 1023 else {
                throw QCow2Error.malformed(path: path, field: "backing_file_size", detail: "\(h.backingFileSize) is too long (at most 1023)")
            }
            let end = h.backingFileOffset + UInt64(h.backingFileSize)
            guard end <= UInt64(g.clusterSize), end <= fileSize else {
                throw QCow2Error.malformed(path: path, field: "backing file name", detail: "runs past the header cluster")
            }
            let o = Int(h.backingFileOffset)
            let nameBytes = cluster0[o..<(o + Int(h.backingFileSize))]
            self.backingFileName = nameBytes.isEmpty ? nil : PathCodec.decode(nameBytes)
        } else {
            self.backingFileName = nil
        }

        // L1 table.
        let needed = g.l1EntriesNeeded(size: h.size)
        guard UInt64(h.l1Size) * 8 <= UInt64(Geometry.maxL1Bytes) else {
            throw QCow2Error.malformed(path: path, field: "l1_size", detail: "\(h.l1Size) entries is too large (at most \(Geometry.maxL1Bytes / 8))")
        }
        guard UInt64(h.l1Size) >= needed else {
            throw QCow2Error.malformed(path: path, field: "l1_size",
                             detail: "L1 table is too small (\(h.l1Size) entries, the disk size needs \(needed))")
        }
        try Self.checkTable(path, "l1_table_offset", h.l1TableOffset, bytes: UInt64(h.l1Size) * 8, g: g, fileSize: fileSize)
        var l1: [UInt64] = []
        if h.l1Size > 0 {
            let raw = try file.read(count: Int(h.l1Size) * 8, at: h.l1TableOffset)
            raw.withUnsafeBytes { decodeBigEndianU64($0, into: &l1) }
        }
        self.l1Table = l1

        // Refcount table.
        guard h.refcountTableClusters > 0 else {
            throw QCow2Error.malformed(path: path, field: "refcount_table_clusters", detail: "the image has no refcount table (0 clusters)")
        }
        guard UInt64(h.refcountTableClusters) << UInt64(g.clusterBits) <= UInt64(Geometry.maxRefcountTableBytes) else {
            throw QCow2Error.malformed(path: path, field: "refcount_table_clusters", detail: "\(h.refcountTableClusters) is too large")
        }
        try Self.checkTable(path, "refcount_table_offset", h.refcountTableOffset,
                            bytes: UInt64(h.refcountTableClusters) << UInt64(g.clusterBits), g: g, fileSize: fileSize)

        self.l2Cache = TableCache(tableBytes: g.clusterSize, budget: cacheBytes)
        self.snapshots = try Self.loadSnapshots(path: path, file: file, header: h, g: g, fileSize: fileSize)
        self.bitmapsExtension = bext
        if let bext, h.autoclearFeatures & Features.autoclearBitmaps != 0 {
            do {
                self.bitmaps = try Self.loadBitmapDirectory(path: path, file: file, ext: bext, header: h, g: g, fileSize: fileSize)
            } catch let e as QCow2Error where tolerateBrokenBitmaps {
                self.bitmaps = []
                self.bitmapsError = e
            }
        } else {
            self.bitmaps = []
        }
    }

    /// Alignment, overflow and end-of-file checks for a table's location.
    static func checkTable(_ path: String, _ field: String, _ offset: UInt64, bytes: UInt64, g: Geometry, fileSize: UInt64) throws {
        guard bytes > 0 else { return }
        guard g.isAligned(offset) else {
            throw QCow2Error.malformed(path: path, field: field, detail: "0x\(hex(offset)) is not cluster-aligned")
        }
        guard offset < Geometry.maxHostOffset, bytes < Geometry.maxHostOffset else {
            throw QCow2Error.malformed(path: path, field: field, detail: "0x\(hex(offset)) is out of range")
        }
        guard offset != 0 else {
            throw QCow2Error.malformed(path: path, field: field, detail: "the table overlaps the header (offset 0)")
        }
        guard offset < fileSize else {
            throw QCow2Error.malformed(path: path, field: field, detail: "0x\(hex(offset)) lies beyond the end of the file (\(fileSize) bytes)")
        }
    }

    static func loadSnapshots(path: String, file: BlockFile, header h: Header, g: Geometry, fileSize: UInt64) throws -> [SnapshotEntry] {
        guard h.nbSnapshots > 0 else { return [] }
        guard h.nbSnapshots <= SnapshotEntry.maxSnapshots else {
            throw QCow2Error.malformed(path: path, field: "nb_snapshots", detail: "\(h.nbSnapshots) is too many (at most 65536)")
        }
        try checkTable(path, "snapshots_offset", h.snapshotsOffset, bytes: 1, g: g, fileSize: fileSize)
        var out: [SnapshotEntry] = []
        out.reserveCapacity(Int(h.nbSnapshots))
        var pos: UInt64 = 0
        var ids = Set<String>()
        for i in 0..<Int(h.nbSnapshots) {
            guard pos < SnapshotEntry.maxTableBytes, h.snapshotsOffset + pos < fileSize else {
                throw QCow2Error.malformed(path: path, field: "snapshot table", detail: "entry \(i) lies beyond the end of the file or the table size limit")
            }
            let fixed = try file.read(count: SnapshotEntry.fixedSize, at: h.snapshotsOffset + pos)
            let entryBytes: Int
            do { entryBytes = try SnapshotEntry.entrySize(fixedPart: ByteReader(fixed)) } catch { throw error.at(path) }
            let chunk = try file.read(count: entryBytes, at: h.snapshotsOffset + pos)
            let (e, size): (SnapshotEntry, Int)
            do { (e, size) = try SnapshotEntry.parse(ByteReader(chunk), at: 0, version: h.version) } catch { throw error.at(path) }
            // An entry whose L1 table is unusable does not stop the image from opening (as in
            // QEMU): check reports it, loading the snapshot and every writer refuse it.
            ids.insert(e.id)
            out.append(e)
            pos += UInt64(size)
        }
        guard pos <= SnapshotEntry.maxTableBytes else {
            throw QCow2Error.malformed(path: path, field: "snapshot table", detail: "the table is larger than 64 MiB")
        }
        return out
    }

    /// Why a snapshot's L1 table cannot be used (qemu-img check's words), if it cannot:
    /// unaligned, too large, or (`fileSize` given, as for writers) beyond the end of the file.
    static func snapshotL1Problem(_ sn: SnapshotEntry, g: Geometry, fileSize: UInt64? = nil) -> String? {
        if !g.isAligned(sn.l1TableOffset) {
            return "l1_offset=0x\(hex(sn.l1TableOffset)): L1 table is not cluster aligned"
        }
        if UInt64(sn.l1Size) * 8 > UInt64(Geometry.maxL1Bytes) { return "l1_size=0x\(hex(sn.l1Size)): L1 table is too large" }
        if let fileSize, sn.l1TableOffset > fileSize || UInt64(sn.l1Size) * 8 > fileSize - sn.l1TableOffset {
            return "l1_offset=0x\(hex(sn.l1TableOffset)): L1 table lies beyond the end of the file"
        }
        return nil
    }

    static func loadBitmapDirectory(path: String, file: BlockFile, ext: BitmapsExtension, header h: Header, g: Geometry, fileSize: UInt64) throws -> [BitmapDirectoryEntry] {
        let f = "bitmaps extension"
        guard ext.nbBitmaps > 0 else { throw QCow2Error.malformed(path: path, field: f, detail: "it declares zero bitmaps") }
        guard ext.nbBitmaps <= BitmapsExtension.maxBitmaps else {
            throw QCow2Error.malformed(path: path, field: f, detail: "\(ext.nbBitmaps) bitmaps is too many (at most 65535)")
        }
        guard ext.reserved == 0 else { throw QCow2Error.malformed(path: path, field: f, detail: "the reserved field is not zero") }
        guard ext.directorySize > 0, ext.directorySize <= BitmapsExtension.maxDirectorySize else {
            throw QCow2Error.malformed(path: path, field: "bitmap directory size", detail: "\(ext.directorySize) is out of range")
        }
        try checkTable(path, "bitmap directory offset", ext.directoryOffset, bytes: ext.directorySize, g: g, fileSize: fileSize)
        guard h.version >= 3 else { throw QCow2Error.malformed(path: path, field: f, detail: "bitmaps need a version 3 image") }
        let dir = try file.read(count: Int(ext.directorySize), at: ext.directoryOffset)
        let r = ByteReader(dir)
        var out: [BitmapDirectoryEntry] = []
        var pos = 0
        var names = Set<String>()
        while pos < dir.count {
            let (e, size): (BitmapDirectoryEntry, Int)
            do { (e, size) = try BitmapDirectoryEntry.parse(r, at: pos) } catch {
                throw QCow2Error.malformed(path: path, field: "bitmap directory", detail: "broken directory (\(error.field): \(error.detail))")
            }
            pos += size
            out.append(e)
            guard out.count <= Int(ext.nbBitmaps) else { break }
            let who = "bitmap '\(e.name)'"
            guard e.type == 1 else { throw QCow2Error.malformed(path: path, field: who, detail: "unknown bitmap type \(e.type)") }
            guard (9...31).contains(Int(e.granularityBits)) else {
                throw QCow2Error.malformed(path: path, field: who, detail: "granularity bits \(e.granularityBits) out of range (9..31)")
            }
            guard !e.name.isEmpty, e.name.utf8.count <= BitmapDirectoryEntry.maxNameSize else {
                throw QCow2Error.malformed(path: path, field: who, detail: "name length out of range (1..1023)")
            }
            guard e.extraData.isEmpty else { throw QCow2Error.malformed(path: path, field: who, detail: "bitmap extra data is not supported") }
            guard e.flags & ~BitmapDirectoryEntry.knownFlags == 0 else {
                throw QCow2Error.malformed(path: path, field: who, detail: "unknown flags 0x\(hex(e.flags))")
            }
            guard names.insert(e.name).inserted else { throw QCow2Error.malformed(path: path, field: who, detail: "duplicate bitmap name") }
            guard UInt64(e.tableSize) <= BitmapDirectoryEntry.maxTableEntries,
                  UInt64(e.tableSize) << UInt64(g.clusterBits) <= BitmapDirectoryEntry.maxDataBytes else {
                throw QCow2Error.malformed(path: path, field: who, detail: "bitmap table of \(e.tableSize) entries is too large")
            }
            try checkTable(path, "\(who) table offset", e.tableOffset, bytes: max(1, UInt64(e.tableSize) * 8), g: g, fileSize: fileSize)
            guard e.tableOffset != 0 else { throw QCow2Error.malformed(path: path, field: who, detail: "table offset is zero") }
            if !e.inUse {
                let want = BitmapDirectoryEntry.tableSize(diskSize: h.size, granularityBits: Int(e.granularityBits), clusterSize: g.clusterSize)
                guard UInt64(e.tableSize) == want else {
                    throw QCow2Error.malformed(path: path, field: who, detail: "table size \(e.tableSize) does not match the disk size (expected \(want))")
                }
                try validateBitmapTable(path: path, file: file, entry: e, g: g, fileSize: fileSize)
            }
        }
        guard pos == dir.count, out.count == Int(ext.nbBitmaps) else {
            throw QCow2Error.malformed(path: path, field: "bitmap directory",
                             detail: "found \(out.count) bitmaps in \(pos) bytes, the extension declares \(ext.nbBitmaps) in \(dir.count)")
        }
        return out
    }

    /// Reads a bitmap table in chunks and checks every entry (reserved bits, alignment).
    static func validateBitmapTable(path: String, file: BlockFile, entry e: BitmapDirectoryEntry, g: Geometry, fileSize: UInt64) throws {
        let chunkEntries = 8192
        var done = 0
        let total = Int(e.tableSize)
        var words: [UInt64] = []
        while done < total {
            let n = min(chunkEntries, total - done)
            let raw = try file.read(count: n * 8, at: e.tableOffset + UInt64(done * 8))
            raw.withUnsafeBytes { decodeBigEndianU64($0, into: &words) }
            for (i, w) in words.enumerated() {
                let off = w & 0x00FF_FFFF_FFFF_FE00
                if w & 0xFF00_0000_0000_01FE != 0 || (off != 0 && w & 1 != 0) || !g.isAligned(off) {
                    throw QCow2Error.malformed(path: path, field: "bitmap '\(e.name)' table",
                                     detail: "invalid entry \(done + i) (0x\(hex(w)))")
                }
            }
            done += n
        }
    }

    // MARK: - Mapping

    /// Whether host `offset` lies inside the file. A writer refreshes `fileSize` before
    /// saying no: a write request that failed after growing the file (an I/O error while
    /// freeing, after its new L2 table was already in use) leaves it stale, and the next
    /// request must not take its own new table for corruption.
    func isInsideFile(_ offset: UInt64) throws -> Bool {
        if offset < fileSize { return true }
        guard file.writable else { return false }
        fileSize = try file.size()
        return offset < fileSize
    }

    /// Loads the L2 table at `offset` through the cache.
    func l2Table(at offset: UInt64, l1Index: Int) throws -> [UInt8] {
        guard geometry.isAligned(offset) else {
            throw QCow2Error.malformed(path: path, field: "L1 entry \(l1Index)", detail: "L2 table offset 0x\(hex(offset)) is not cluster-aligned")
        }
        guard try isInsideFile(offset) else {
            throw QCow2Error.malformed(path: path, field: "L1 entry \(l1Index)", detail: "L2 table offset 0x\(hex(offset)) lies beyond the end of the file")
        }
        let f = file
        return try l2Cache.table(at: offset) { (buf: inout [UInt8]) throws in
            try buf.withUnsafeMutableBytes { (b: UnsafeMutableRawBufferPointer) throws in
                try f.read(into: b, at: offset)
            }
        }
    }

    @inline(__always)
    func l2Entry(_ table: [UInt8], _ index: Int) -> L2Entry {
        table.withUnsafeBytes { b in
            if geometry.extendedL2 {
                let o = index * 16
                return L2Entry(UInt64(bigEndian: b.loadUnaligned(fromByteOffset: o, as: UInt64.self)),
                               bitmap: UInt64(bigEndian: b.loadUnaligned(fromByteOffset: o + 8, as: UInt64.self)))
            }
            return L2Entry(UInt64(bigEndian: b.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self)))
        }
    }

    public func layerExtent(at offset: UInt64, maxLength: UInt64) throws -> LayerExtent {
        guard offset < virtualSize, maxLength > 0 else {
            throw QCow2Error.invalidArgument(path: path, detail: "extent query at \(offset) is outside the image")
        }
        let g = geometry
        let limit = min(maxLength, virtualSize - offset)
        // Never cross the end of one L2 table's range.
        let l2End = (offset | (g.bytesPerL2 - 1)) &+ 1  // cannot overflow: offset < size < 2^63
        let span = min(limit, l2End - offset)
        let l1i = g.l1Index(offset)
        guard l1i < l1Table.count else { return LayerExtent(length: span, descriptor: .unallocated(host: nil)) }
        let l1e = L1Entry(l1Table[l1i])
        let l2Offset = l1e.l2Offset
        if l2Offset == 0 { return LayerExtent(length: span, descriptor: .unallocated(host: nil)) }
        let table = try l2Table(at: l2Offset, l1Index: l1i)

        let unitBits = g.subclusterBits
        let unit = UInt64(1) << UInt64(unitBits)
        var index = g.l2Index(offset)
        var sub = g.extendedL2 ? Int((offset >> UInt64(unitBits)) & 31) : 0
        let inUnit = offset & (unit - 1)

        func describe(_ idx: Int, _ s: Int) throws -> ClusterDescriptor {
            do { return try l2Entry(table, idx).descriptor(geometry: g, subcluster: s, externalData: hasExternalDataFile) } catch {
                throw QCow2Error.malformed(path: path, field: "L2 entry \(idx) of table 0x\(hex(l2Offset))", detail: error.detail)
            }
        }
        let first = try describe(index, sub)
        var length = unit - inUnit
        var start: ClusterDescriptor = first
        switch first {
        case .normal(let h): start = .normal(host: h + inUnit)
        case .zero(let h?): start = .zero(host: h + inUnit)
        case .unallocated(let h?): start = .unallocated(host: h + inUnit)
        case .compressed:
            // One cluster at a time: each has its own stream.
            let rest = UInt64(g.clusterSize) - g.offsetInCluster(offset)
            return LayerExtent(length: min(span, rest), descriptor: first)
        default: break
        }
        var expect = first
        while length < span {
            // Advance one unit.
            if g.extendedL2 {
                sub += 1
                if sub == 32 { sub = 0; index += 1 }
            } else {
                index += 1
            }
            if index >= g.l2Entries { break }
            let next = try describe(index, sub)
            let cont: Bool
            switch (expect, next) {
            case (.normal(let a), .normal(let b)): cont = b == a + unit
            case (.zero(nil), .zero(nil)), (.unallocated(nil), .unallocated(nil)): cont = true
            case (.zero(let a?), .zero(let b?)), (.unallocated(let a?), .unallocated(let b?)): cont = b == a + unit
            default: cont = false
            }
            if !cont { break }
            expect = next
            length += unit
        }
        return LayerExtent(length: min(length, span), descriptor: start)
    }

    // MARK: - Reading

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        if let refusal = protectionRefusal(writing: false) { throw refusal }
        var done = 0
        while done < buffer.count {
            let off = offset + UInt64(done)
            let want = UInt64(buffer.count - done)
            let ext = try layerExtent(at: off, maxLength: want)
            let n = Int(ext.length)
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + n)])
            switch ext.descriptor {
            case .normal(let host):
                try (dataFile ?? file).read(into: part, at: host)
            case .zero:
                part.initializeMemory(as: UInt8.self, repeating: 0)
            case .unallocated:
                try readBacking(into: part, at: off)
            case .compressed(let coff, let clen):
                let key = geometry.clusterStart(off)
                try decompress(guestCluster: key, offset: coff, length: clen)
                let inCluster = Int(geometry.offsetInCluster(off))
                decompressedCluster.withUnsafeBytes { src in
                    part.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[inCluster..<(inCluster + n)]))
                }
            }
            done += n
        }
    }

    private func decompress(guestCluster key: UInt64, offset: UInt64, length: Int) throws {
        if decompressedKey == key { return }
        guard try isInsideFile(offset) else {
            throw QCow2Error.malformed(path: path, field: "compressed cluster at guest offset 0x\(hex(key))",
                             detail: "data offset 0x\(hex(offset)) lies beyond the end of the file")
        }
        let cs = geometry.clusterSize
        if decompressedCluster.count != cs { decompressedCluster = [UInt8](repeating: 0, count: cs) }
        if compressedInput.count < length { compressedInput = [UInt8](repeating: 0, count: length) }
        let f = file
        try compressedInput.withUnsafeMutableBytes { (b: UnsafeMutableRawBufferPointer) throws in
            try f.read(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<length]), at: offset)
        }
        let type = compressionType
        decompressedKey = .max
        let ok = compressedInput.withUnsafeBytes { inp in
            decompressedCluster.withUnsafeMutableBytes { out in
                Codec.decompress(type, input: UnsafeRawBufferPointer(rebasing: inp[0..<length]), output: out)
            }
        }
        guard ok else {
            throw QCow2Error.malformed(path: path, field: "compressed cluster at guest offset 0x\(hex(key))",
                             detail: "\(type.name) data at 0x\(hex(offset)) does not decompress to a full cluster")
        }
        decompressedKey = key
    }
}
