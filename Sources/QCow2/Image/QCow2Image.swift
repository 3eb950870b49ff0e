/// A qcow2 image: the `DiskImage` commands use. It composes the parts that hold the
/// image's state, each with one job:
/// - `HeaderStore` (`headers`): header, extensions, backing file name, cluster 0's layout;
/// - `ClusterMap` (`map`): L1/L2 lookups, the extent query, checks before a write;
/// - `Allocator` (`allocator`, writers only): refcounts and allocation;
/// - the bitmap store (Features/Bitmaps/BitmapStore.swift): the bitmap directory and
///   tracked bitmaps; the snapshot list (below).
/// `ImageValidator` checks all of it when the image is opened; every metadata change goes
/// through `MetadataTransaction`. Reads are here; writes are in QCow2Image+Write.swift,
/// +Zero and +Compressed, the write session in +Session.
public final class QCow2Image: DiskImage {
    public let path: String
    public let file: BlockFile
    public let geometry: Geometry
    let headers: HeaderStore
    let map: ClusterMap
    public internal(set) var backing: (any DiskImage)?
    /// The external data file (QCow2Image+Protection.swift), when the image has one.
    public internal(set) var dataFile: BlockFile?
    public internal(set) var snapshots: [SnapshotEntry]
    /// The bitmaps extension as stored (nil when absent).
    public internal(set) var bitmapsExtension: BitmapsExtension?
    /// Bitmaps QEMU would load: empty when the autoclear bit says they are stale.
    public internal(set) var bitmaps: [BitmapDirectoryEntry]
    /// Why the bitmaps could not be loaded (only with `tolerateBrokenBitmaps`).
    public internal(set) var bitmapsError: QCow2Error?

    /// Set when the image is open for writing.
    var allocator: Allocator?
    /// Writes already prepared the image (bitmaps, autoclear bits, dirty bit).
    var preparedForWrites = false
    /// Where the next compressed stream may go: a host cluster and the bytes used in it.
    var compressedPacking: (host: UInt64, used: UInt64)?
    /// Enabled bitmaps kept in step with guest writes during this session (by name).
    var trackedBitmaps: [String: DirtyBitmap] = [:]
    /// The last compressed cluster read, decoded.
    let decompressed = DecompressedCluster()

    /// Default byte cap of the L2 cache.
    public static let defaultCacheBytes = 32 * 1024 * 1024
    /// Byte cap of the L2 cache for one pass over the disk in guest order (a backup's
    /// source): each table serves one run and is not needed again, so a few suffice and
    /// memory stays flat however many tables the pass reads.
    public static let streamingCacheBytes = 1024 * 1024

    /// `tolerateBrokenBitmaps`: open even when the bitmaps extension or directory is invalid
    /// (which QEMU refuses); the problem is kept in `bitmapsError` for check and repair.
    public init(path: String, file: BlockFile, cacheBytes: Int = QCow2Image.defaultCacheBytes, tolerateBrokenBitmaps: Bool = false) throws {
        let v = try ImageValidator(path: path, file: file)
        let (h, g, cluster0) = try v.readHeader()
        let exts = try v.readExtensions(h, g, cluster0: cluster0)
        try v.checkIncompatibleFeatures(h, names: exts.featureNames)
        try Self.validateProtection(header: h, extensions: exts.extensions, path: path, clusterSize: g.clusterSize, fileSize: v.fileSize)
        let compression = try v.compressionType(h)
        let backingName = try v.backingFileName(h, g, cluster0: cluster0)
        let l1 = try v.loadL1Table(h, g)
        try v.checkRefcountTable(h, g)
        self.path = path
        self.file = file
        self.geometry = g
        let headers = HeaderStore(path: path, file: file, geometry: g, header: h, extensions: exts.extensions,
                                  backingFileName: backingName, backingFormat: exts.backingFormat,
                                  featureNames: exts.featureNames, compressionType: compression)
        self.headers = headers
        self.map = ClusterMap(headers: headers, l1Table: l1, fileSize: v.fileSize, cacheBytes: cacheBytes)
        self.snapshots = try Self.loadSnapshots(path: path, file: file, header: h, g: g, fileSize: v.fileSize)
        self.bitmapsExtension = exts.bitmaps
        self.bitmaps = []
        if let bext = exts.bitmaps, h.autoclearFeatures & Features.autoclearBitmaps != 0 {
            do {
                self.bitmaps = try ImageValidator.loadBitmapDirectory(path: path, file: file, ext: bext, header: h, g: g, fileSize: v.fileSize)
            } catch let e as QCow2Error where tolerateBrokenBitmaps {
                self.bitmapsError = e
            }
        }
    }

    // MARK: - The parts' state, by its usual names

    public internal(set) var header: Header {
        get { headers.header }
        set { headers.header = newValue }
    }
    public internal(set) var extensions: [HeaderExtension] {
        get { headers.extensions }
        set { headers.extensions = newValue }
    }
    /// The backing file name as stored in the image.
    public internal(set) var backingFileName: String? {
        get { headers.backingFileName }
        set { headers.backingFileName = newValue }
    }
    /// The backing format from the header extension, if any.
    public var backingFormat: String? { headers.backingFormat }
    public var featureNames: [FeatureName] { headers.featureNames }
    public var compressionType: CompressionType { headers.compressionType }
    public internal(set) var l1Table: [UInt64] {
        get { map.l1Table }
        set { map.l1Table = newValue }
    }
    /// Length of the host file when opened (refreshed by writers).
    public internal(set) var fileSize: UInt64 {
        get { map.fileSize }
        set { map.fileSize = newValue }
    }
    var l2Cache: TableCache { map.l2Cache }
    func l2Entry(_ table: [UInt8], _ index: Int) -> L2Entry { map.l2Entry(table, index) }
    /// For check -r's repairs, until they move onto `MetadataTransaction`.
    func setL1Entry(_ i: Int, _ value: UInt64) throws { try MetadataTransaction.setL1Entry(i, value, in: self) }

    public var formatName: String { "qcow2" }
    /// The disk size in whole 512-byte sectors, as QEMU sees it.
    public var virtualSize: UInt64 { map.virtualSize }

    // MARK: - Reading

    public func layerExtent(at offset: UInt64, maxLength: UInt64) throws -> LayerExtent {
        guard offset < virtualSize, maxLength > 0 else {
            throw QCow2Error.invalidArgument(path: path, detail: "extent query at \(offset) is outside the image")
        }
        return try map.layerExtent(at: offset, maxLength: maxLength)
    }

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
                try decompressed.load(guestCluster: key, offset: coff, length: clen, of: self)
                decompressed.copy(from: Int(geometry.offsetInCluster(off)), into: part)
            }
            done += n
        }
    }
}

// MARK: - The snapshot list

extension QCow2Image {
    static func checkTable(_ path: String, _ field: String, _ offset: UInt64, bytes: UInt64, g: Geometry, fileSize: UInt64) throws {
        try ImageValidator.checkTable(path, field, offset, bytes: bytes, g: g, fileSize: fileSize)
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
}
