/// The open-time validation of a qcow2 file, one named step each, in the order
/// `QCow2Image.init` runs them: everything the image will rely on is checked before any
/// guest read (Docs/architecture.md, "Opening an image").
struct ImageValidator {
    let path: String
    let file: BlockFile
    let fileSize: UInt64

    init(path: String, file: BlockFile) throws {
        self.path = path
        self.file = file
        self.fileSize = try file.size()
    }

    private func bad(_ e: FormatError) -> QCow2Error { e.at(path) }

    /// What the extension list says about the rest of the image.
    struct ExtensionSummary {
        var extensions: [HeaderExtension] = []
        var featureNames: [FeatureName] = []
        var backingFormat: String?
        var bitmaps: BitmapsExtension?
        var fullDiskEncryption = false
    }

    // MARK: 1. Header and geometry

    /// The fixed header (magic, version, header length) and the geometry, and cluster 0.
    func readHeader() throws -> (Header, Geometry, cluster0: [UInt8]) {
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
        guard UInt64(h.length) <= fileSize else {
            throw QCow2Error.malformed(path: path, field: "", detail: "qcow2 header too short (header_length \(h.length), the file has \(fileSize) bytes)")
        }
        return (h, g, cluster0)
    }

    // MARK: 2. Extensions and features

    /// The extension list inside cluster 0: it ends where the backing file name starts,
    /// or at the end of the cluster.
    func readExtensions(_ h: Header, _ g: Geometry, cluster0: [UInt8]) throws -> ExtensionSummary {
        var extEnd = g.clusterSize
        if h.backingFileOffset != 0 {
            guard h.backingFileOffset <= UInt64(g.clusterSize) else {
                throw QCow2Error.malformed(path: path, field: "backing_file_offset",
                                 detail: "0x\(hex(h.backingFileOffset)) lies outside the header cluster")
            }
            extEnd = Int(h.backingFileOffset)
        }
        var s = ExtensionSummary()
        do { s.extensions = try HeaderExtension.parseList(ByteReader(cluster0), start: h.length, end: extEnd) } catch { throw bad(error) }
        for e in s.extensions {
            switch e {
            case .featureNameTable(let n): s.featureNames += n
            case .backingFormat(let f): s.backingFormat = f
            case .bitmaps(let b): s.bitmaps = b
            case .fullDiskEncryption: s.fullDiskEncryption = true
            default: break
            }
        }
        return s
    }

    /// Unknown incompatible feature bits, named from the feature name table when it has them.
    func checkIncompatibleFeatures(_ h: Header, names: [FeatureName]) throws {
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
    }


    /// The compression type field and the feature bit agree.
    func compressionType(_ h: Header) throws -> CompressionType {
        guard h.version >= 3 && h.headerLength > 104 else {
            if h.incompatibleFeatures & Features.compressionType != 0 {
                throw QCow2Error.malformed(path: path, field: "compression_type",
                                 detail: "the compression type feature bit is set but the header has no compression type field")
            }
            return .zlib
        }
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
        return ct
    }

    /// The backing file name, inside cluster 0 and the file.
    func backingFileName(_ h: Header, _ g: Geometry, cluster0: [UInt8]) throws -> String? {
        guard h.backingFileOffset != 0 else { return nil }
        guard h.backingFileSize <= 1023 else {
            throw QCow2Error.malformed(path: path, field: "backing_file_size", detail: "\(h.backingFileSize) is too long (at most 1023)")
        }
        let end = h.backingFileOffset + UInt64(h.backingFileSize)
        guard end <= UInt64(g.clusterSize), end <= fileSize else {
            throw QCow2Error.malformed(path: path, field: "backing file name", detail: "runs past the header cluster")
        }
        let o = Int(h.backingFileOffset)
        let nameBytes = cluster0[o..<(o + Int(h.backingFileSize))]
        return nameBytes.isEmpty ? nil : PathCodec.decode(nameBytes)
    }

    // MARK: 3. Table locations

    /// The L1 table: at least what the disk needs, at most 32 MiB, inside the file.
    func loadL1Table(_ h: Header, _ g: Geometry) throws -> [UInt64] {
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
        return l1
    }

    /// The refcount table: not empty, at most 8 MiB, inside the file.
    func checkRefcountTable(_ h: Header, _ g: Geometry) throws {
        guard h.refcountTableClusters > 0 else {
            throw QCow2Error.malformed(path: path, field: "refcount_table_clusters", detail: "the image has no refcount table (0 clusters)")
        }
        guard UInt64(h.refcountTableClusters) << UInt64(g.clusterBits) <= UInt64(Geometry.maxRefcountTableBytes) else {
            throw QCow2Error.malformed(path: path, field: "refcount_table_clusters", detail: "\(h.refcountTableClusters) is too large")
        }
        try Self.checkTable(path, "refcount_table_offset", h.refcountTableOffset,
                            bytes: UInt64(h.refcountTableClusters) << UInt64(g.clusterBits), g: g, fileSize: fileSize)
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
}
