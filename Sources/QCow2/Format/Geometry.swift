/// Sizes and index math derived from validated header values. Built only by
/// `Geometry(header:)`, which rejects out-of-range fields, so the arithmetic
/// here cannot overflow.
public struct Geometry: Equatable, Sendable {
    public let clusterBits: Int
    public let clusterSize: Int
    public let extendedL2: Bool
    /// Bytes per L2 entry: 8, or 16 with extended L2.
    public let l2EntrySize: Int
    public let l2Entries: Int
    public let l2Bits: Int
    public let subclusterBits: Int
    public let refcountOrder: Int
    public let refcountBits: Int
    /// log2(refcount entries per refcount block).
    public let refblockBits: Int

    public static let minClusterBits = 9
    public static let maxClusterBits = 21
    /// QEMU's limit on the active L1 table: 32 MiB.
    public static let maxL1Bytes = 32 * 1024 * 1024
    /// QEMU's limit on the refcount table: 8 MiB.
    public static let maxRefcountTableBytes = 8 * 1024 * 1024
    /// Host offsets of clusters and tables must be below 2^56.
    public static let maxHostOffset: UInt64 = 1 << 56

    public init(clusterBits: Int, extendedL2: Bool, refcountOrder: Int) throws(FormatError) {
        guard (Geometry.minClusterBits...Geometry.maxClusterBits).contains(clusterBits) else {
            throw FormatError("cluster_bits", "\(clusterBits) is out of range (cluster size must be 512 B .. 2 MiB)")
        }
        guard (0...6).contains(refcountOrder) else {
            throw FormatError("refcount_order", "\(refcountOrder) is out of range (0..6)")
        }
        if extendedL2 && clusterBits < 14 {
            throw FormatError("cluster_bits", "extended L2 entries need clusters of at least 16 KiB")
        }
        self.clusterBits = clusterBits
        self.clusterSize = 1 << clusterBits
        self.extendedL2 = extendedL2
        self.l2EntrySize = extendedL2 ? 16 : 8
        self.l2Bits = clusterBits - (extendedL2 ? 4 : 3)
        self.l2Entries = 1 << l2Bits
        self.subclusterBits = extendedL2 ? clusterBits - 5 : clusterBits
        self.refcountOrder = refcountOrder
        self.refcountBits = 1 << refcountOrder
        self.refblockBits = clusterBits + 3 - refcountOrder
    }

    @inline(__always) public func l1Index(_ guest: UInt64) -> Int { Int(truncatingIfNeeded: guest >> UInt64(clusterBits + l2Bits)) }
    @inline(__always) public func l2Index(_ guest: UInt64) -> Int { Int(truncatingIfNeeded: (guest >> UInt64(clusterBits)) & UInt64(l2Entries - 1)) }
    @inline(__always) public func offsetInCluster(_ v: UInt64) -> UInt64 { v & UInt64(clusterSize - 1) }
    @inline(__always) public func clusterStart(_ v: UInt64) -> UInt64 { v & ~UInt64(clusterSize - 1) }
    @inline(__always) public func isAligned(_ v: UInt64) -> Bool { v & UInt64(clusterSize - 1) == 0 }
    /// Bytes of guest space one L2 table covers.
    public var bytesPerL2: UInt64 { UInt64(1) << UInt64(clusterBits + l2Bits) }

    /// Number of L1 entries a disk of `size` bytes needs.
    public func l1EntriesNeeded(size: UInt64) -> UInt64 {
        let shift = UInt64(clusterBits + l2Bits)
        return (size >> shift) + ((size & ((1 << shift) - 1)) != 0 ? 1 : 0)
    }

    /// Number of clusters needed for `bytes` bytes.
    public func clusters(forBytes bytes: UInt64) -> UInt64 {
        (bytes >> UInt64(clusterBits)) + (offsetInCluster(bytes) != 0 ? 1 : 0)
    }

    /// The bits of subclusters `a` through `b` (0...31) in an extended L2 bitmap half.
    static func subclusterMask(from a: Int, through b: Int) -> UInt32 {
        let hi: UInt32 = b >= 31 ? .max : (UInt32(1) << UInt32(b + 1)) - 1
        let lo: UInt32 = (UInt32(1) << UInt32(a)) - 1
        return hi & ~lo
    }
}
