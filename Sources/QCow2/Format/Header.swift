/// The fixed qcow2 header (v2: 72 bytes; v3: `header_length` bytes, at least 104).
/// Parsing checks only that the bytes are there; `validate` checks the values.
public struct Header: Equatable, Sendable {
    public static let magic: UInt32 = 0x5146_49FB
    public static let v2Length = 72
    public static let v3MinLength = 104

    public var version: UInt32
    public var backingFileOffset: UInt64
    public var backingFileSize: UInt32
    public var clusterBits: UInt32
    public var size: UInt64
    public var cryptMethod: UInt32
    public var l1Size: UInt32
    public var l1TableOffset: UInt64
    public var refcountTableOffset: UInt64
    public var refcountTableClusters: UInt32
    public var nbSnapshots: UInt32
    public var snapshotsOffset: UInt64
    public var incompatibleFeatures: UInt64
    public var compatibleFeatures: UInt64
    public var autoclearFeatures: UInt64
    public var refcountOrder: UInt32
    public var headerLength: UInt32
    public var compressionType: UInt8
    /// Bytes of the header past offset 112 that this version does not know; kept verbatim.
    public var unknownTail: [UInt8]

    public init(parsing r: ByteReader) throws(FormatError) {
        let magic = try r.u32(0, "header")
        guard magic == Header.magic else { throw FormatError("magic", "not a qcow2 image") }
        version = try r.u32(4, "header version")
        guard version == 2 || version == 3 else {
            throw FormatError("version", "unsupported qcow2 version \(version)")
        }
        backingFileOffset = try r.u64(8, "backing_file_offset")
        backingFileSize = try r.u32(16, "backing_file_size")
        clusterBits = try r.u32(20, "cluster_bits")
        size = try r.u64(24, "size")
        cryptMethod = try r.u32(32, "crypt_method")
        l1Size = try r.u32(36, "l1_size")
        l1TableOffset = try r.u64(40, "l1_table_offset")
        refcountTableOffset = try r.u64(48, "refcount_table_offset")
        refcountTableClusters = try r.u32(56, "refcount_table_clusters")
        nbSnapshots = try r.u32(60, "nb_snapshots")
        snapshotsOffset = try r.u64(64, "snapshots_offset")
        unknownTail = []
        if version == 2 {
            incompatibleFeatures = 0
            compatibleFeatures = 0
            autoclearFeatures = 0
            refcountOrder = 4
            headerLength = UInt32(Header.v2Length)
            compressionType = 0
            return
        }
        incompatibleFeatures = try r.u64(72, "incompatible_features")
        compatibleFeatures = try r.u64(80, "compatible_features")
        autoclearFeatures = try r.u64(88, "autoclear_features")
        refcountOrder = try r.u32(96, "refcount_order")
        headerLength = try r.u32(100, "header_length")
        guard headerLength >= UInt32(Header.v3MinLength) else {
            throw FormatError("", "qcow2 header too short (header_length \(headerLength), at least 104)")
        }
        guard headerLength % 8 == 0 else {
            throw FormatError("header_length", "\(headerLength) is not a multiple of 8")
        }
        guard Int(headerLength) <= r.count else {
            throw FormatError("header_length", "\(headerLength) runs past the header cluster")
        }
        compressionType = headerLength > 104 ? try r.u8(104, "compression_type") : 0
        if headerLength > 112 {
            unknownTail = Array(try r.slice(112, Int(headerLength) - 112, "header"))
        }
    }

    /// Checks the magic and version at the start of a file.
    public static func checkMagicAndVersion(_ r: ByteReader) throws(FormatError) {
        guard try r.u32(0, "header") == Header.magic else { throw FormatError("magic", "not a qcow2 image") }
        let v = try r.u32(4, "header version")
        guard v == 2 || v == 3 else { throw FormatError("version", "unsupported qcow2 version \(v)") }
    }

    /// Serialized length in bytes (the extensions start here).
    public var length: Int { version == 2 ? Header.v2Length : Int(headerLength) }

    public func serialize(into out: inout [UInt8]) {
        var w = ByteWriter()
        w.u32(Header.magic); w.u32(version); w.u64(backingFileOffset); w.u32(backingFileSize)
        w.u32(clusterBits); w.u64(size); w.u32(cryptMethod); w.u32(l1Size); w.u64(l1TableOffset)
        w.u64(refcountTableOffset); w.u32(refcountTableClusters); w.u32(nbSnapshots); w.u64(snapshotsOffset)
        if version >= 3 {
            w.u64(incompatibleFeatures); w.u64(compatibleFeatures); w.u64(autoclearFeatures)
            w.u32(refcountOrder); w.u32(headerLength)
            if headerLength > 104 {
                w.u8(compressionType)
                w.zeros(7)
                w.bytes.append(contentsOf: unknownTail)
            }
        }
        out.append(contentsOf: w.bytes)
    }

    public var isDirty: Bool { incompatibleFeatures & Features.dirty != 0 }
    public var isCorrupt: Bool { incompatibleFeatures & Features.corrupt != 0 }
    public var hasExtendedL2: Bool { incompatibleFeatures & Features.extendedL2 != 0 }
    public var hasLazyRefcounts: Bool { compatibleFeatures & Features.lazyRefcounts != 0 }
}

/// Big-endian writer into an owned byte array.
public struct ByteWriter {
    public var bytes: [UInt8] = []
    public init() {}
    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    public mutating func zeros(_ n: Int) { bytes.append(contentsOf: repeatElement(0, count: n)) }
}

extension Header {
    /// The smallest header of `version` with every field zero (refcount order 4 and
    /// header length 104 for version 3): the start of a header being built.
    static func blankHeader(version: UInt32) -> [UInt8] {
        var w = ByteWriter()
        w.u32(Header.magic); w.u32(version)
        w.zeros(version >= 3 ? 104 : 64)
        if version >= 3 {
            w.bytes.withUnsafeMutableBytes { $0.storeBytes(of: UInt32(104).bigEndian, toByteOffset: 100, as: UInt32.self) }
            w.bytes.withUnsafeMutableBytes { $0.storeBytes(of: UInt32(4).bigEndian, toByteOffset: 96, as: UInt32.self) }
        }
        return w.bytes
    }
}

/// The header fields that change after an image is created, each written as one unit
/// (a field and its companion: a table's offset with its size). Writers name the field;
/// its offset and encoding live here only.
public enum HeaderField: Sendable {
    /// backing_file_offset (8) and backing_file_size (16).
    case backingFile
    /// size (24).
    case size
    /// l1_size (36) and l1_table_offset (40).
    case l1Table
    /// refcount_table_offset (48) and refcount_table_clusters (56).
    case refcountTable
    /// incompatible_features (72), compatible_features (80), autoclear_features (88).
    case incompatibleFeatures, compatibleFeatures, autoclearFeatures
    /// refcount_order (96) and header_length (100).
    case refcountOrderAndLength
    /// nb_snapshots (60) and snapshots_offset (64): the snapshot table switched.
    case snapshotTable
    /// size (24) through l1_table_offset (40), crypt_method (32) rewritten as it is: the
    /// active L1 table and the disk size switched together (a snapshot applied).
    case sizeAndL1Table
    /// refcount_table_offset (48) through refcount_order (96), the fields between rewritten
    /// as they are: a refcount structure of another width switched in with one write
    /// (all inside the first 512-byte sector).
    case refcountStructure

    /// Where the field is in the file and its bytes as `h` holds it.
    public func encoded(_ h: Header) -> (offset: UInt64, bytes: [UInt8]) {
        var w = ByteWriter()
        switch self {
        case .backingFile:
            w.u64(h.backingFileOffset); w.u32(h.backingFileSize)
            return (8, w.bytes)
        case .size:
            w.u64(h.size)
            return (24, w.bytes)
        case .l1Table:
            w.u32(h.l1Size); w.u64(h.l1TableOffset)
            return (36, w.bytes)
        case .refcountTable:
            w.u64(h.refcountTableOffset); w.u32(h.refcountTableClusters)
            return (48, w.bytes)
        case .incompatibleFeatures, .compatibleFeatures, .autoclearFeatures:
            let (offset, value): (UInt64, UInt64) = self == .incompatibleFeatures ? (72, h.incompatibleFeatures)
                : self == .compatibleFeatures ? (80, h.compatibleFeatures) : (88, h.autoclearFeatures)
            w.u64(value)
            return (offset, w.bytes)
        case .refcountOrderAndLength:
            w.u32(h.refcountOrder); w.u32(h.headerLength)
            return (96, w.bytes)
        case .snapshotTable:
            w.u32(h.nbSnapshots); w.u64(h.snapshotsOffset)
            return (60, w.bytes)
        case .sizeAndL1Table:
            w.u64(h.size); w.u32(h.cryptMethod); w.u32(h.l1Size); w.u64(h.l1TableOffset)
            return (24, w.bytes)
        case .refcountStructure:
            w.u64(h.refcountTableOffset); w.u32(h.refcountTableClusters)
            w.u32(h.nbSnapshots); w.u64(h.snapshotsOffset)
            w.u64(h.incompatibleFeatures); w.u64(h.compatibleFeatures); w.u64(h.autoclearFeatures)
            w.u32(h.refcountOrder)
            return (48, w.bytes)
        }
    }

    /// Writes `fields` of `h` into the header bytes `bytes` (a header cluster being built).
    public static func patch(_ bytes: inout [UInt8], _ fields: [HeaderField], of h: Header) {
        for f in fields {
            let (o, b) = f.encoded(h)
            bytes.replaceSubrange(Int(o)..<(Int(o) + b.count), with: b)
        }
    }
}

extension BlockFile {
    /// Writes header field `f` as `h` holds it, then a barrier: the one way a header
    /// field changes on disk.
    public func publish(_ f: HeaderField, of h: Header) throws {
        let (offset, bytes) = f.encoded(h)
        try write(bytes, at: offset)
        try sync()
    }
}
