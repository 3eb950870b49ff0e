/// L1 entry: bits 9-55 L2 table offset, bit 63 COPIED, others reserved.
public struct L1Entry: Equatable, Sendable {
    public var raw: UInt64
    public init(_ raw: UInt64) { self.raw = raw }
    public static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    public static let reservedMask: UInt64 = 0x7F00_0000_0000_01FF
    public static let copied: UInt64 = 1 << 63
    public var l2Offset: UInt64 { raw & Self.offsetMask }
    public var isCopied: Bool { raw & Self.copied != 0 }
    public var hasReservedBits: Bool { raw & Self.reservedMask != 0 }
}

/// What one (sub)cluster of guest space is, decoded from its L2 entry.
public enum ClusterDescriptor: Equatable, Sendable {
    /// Not allocated here: read from the backing file (or zeros). `host` is set for an
    /// extended-L2 cluster that has a host cluster but this subcluster is unallocated.
    case unallocated(host: UInt64?)
    /// Reads as zeros; `host` is set when a host cluster is preallocated.
    case zero(host: UInt64?)
    /// Data at this host offset (of the cluster or subcluster start).
    case normal(host: UInt64)
    /// Compressed data: byte offset and the number of bytes to read.
    case compressed(offset: UInt64, length: Int)
}

/// Standard and extended L2 entry decoding (spec "Standard Cluster Descriptor",
/// "Compressed Clusters Descriptor", "Extended L2 Entries").
public struct L2Entry: Equatable, Sendable {
    public var raw: UInt64
    /// Subcluster bitmap (extended L2 only; 0 otherwise).
    public var bitmap: UInt64
    public init(_ raw: UInt64, bitmap: UInt64 = 0) {
        self.raw = raw
        self.bitmap = bitmap
    }
    public static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    public static let copied: UInt64 = 1 << 63
    public static let compressedFlag: UInt64 = 1 << 62
    public static let zeroFlag: UInt64 = 1
    public static let reservedStandard: UInt64 = 0x3F00_0000_0000_01FE

    public var isCompressed: Bool { raw & Self.compressedFlag != 0 }
    public var isCopied: Bool { raw & Self.copied != 0 }
    public var hostOffset: UInt64 { raw & Self.offsetMask }

    /// Compressed descriptor fields for cluster_bits `cb`: (byte offset, additional sectors).
    public func compressedFields(clusterBits cb: Int) -> (offset: UInt64, sectors: UInt64) {
        let x = UInt64(70 - cb)
        let d = raw & ~(Self.copied | Self.compressedFlag)
        let offset = d & ((1 << x) - 1)
        let nsec = d >> x
        return (offset, nsec)
    }

    /// Host clusters touched by a compressed descriptor: [first, last].
    public func compressedHostRange(clusterBits cb: Int) -> (start: UInt64, end: UInt64) {
        let f = compressedFields(clusterBits: cb)
        let start = f.offset & ~UInt64(511)
        let end = start + (f.sectors + 1) * 512  // exclusive; fits: offset < 2^61, sectors < 2^13
        return (start, end)
    }

    /// Decodes the entry for the subcluster `sub` (0 for standard L2).
    /// Throws on entries QEMU treats as invalid.
    /// `externalData`: the image has an external data file, where 0 is a valid host
    /// offset; as in QEMU, an entry with offset 0 and the COPIED flag is then allocated.
    public func descriptor(geometry g: Geometry, subcluster sub: Int, externalData: Bool = false) throws(FormatError) -> ClusterDescriptor {
        if isCompressed {
            if g.extendedL2 && bitmap != 0 {
                throw FormatError("L2 entry", "compressed cluster with a non-zero subcluster bitmap (0x\(hex(raw)))")
            }
            let f = compressedFields(clusterBits: g.clusterBits)
            guard f.offset < Geometry.maxHostOffset else {
                throw FormatError("L2 entry", "compressed data offset 0x\(hex(f.offset)) is out of range")
            }
            let length = Int((f.sectors + 1) * 512 - (f.offset & 511))
            return .compressed(offset: f.offset, length: length)
        }
        let host = hostOffset
        let present = host != 0 || (externalData && isCopied)
        if g.extendedL2 {
            let alloc = UInt32(truncatingIfNeeded: bitmap)
            let zero = UInt32(truncatingIfNeeded: bitmap >> 32)
            if alloc & zero != 0 {
                throw FormatError("L2 entry", "subcluster both allocated and zero (bitmap 0x\(hex(bitmap)))")
            }
            if !present && alloc != 0 {
                throw FormatError("L2 entry", "allocated subclusters without a host cluster (bitmap 0x\(hex(bitmap)))")
            }
            guard g.isAligned(host) else {
                throw FormatError("L2 entry", "host offset 0x\(hex(host)) is not cluster-aligned")
            }
            let bit = UInt32(1) << UInt32(sub)
            let subHost: UInt64? = present ? host + UInt64(sub << g.subclusterBits) : nil
            if alloc & bit != 0 { return .normal(host: host + UInt64(sub << g.subclusterBits)) }
            if zero & bit != 0 { return .zero(host: subHost) }
            return .unallocated(host: subHost)
        }
        if raw & Self.zeroFlag != 0 {
            guard g.isAligned(host) else {
                throw FormatError("L2 entry", "host offset 0x\(hex(host)) is not cluster-aligned")
            }
            return .zero(host: host == 0 ? nil : host)
        }
        if !present { return .unallocated(host: nil) }
        guard g.isAligned(host) else {
            throw FormatError("L2 entry", "host offset 0x\(hex(host)) is not cluster-aligned")
        }
        return .normal(host: host)
    }
}
