/// Feature bits of the qcow2 v3 header (spec: incompatible, compatible, autoclear).
public enum Features {
    public static let dirty: UInt64 = 1 << 0
    public static let corrupt: UInt64 = 1 << 1
    public static let externalDataFile: UInt64 = 1 << 2
    public static let compressionType: UInt64 = 1 << 3
    public static let extendedL2: UInt64 = 1 << 4
    public static let knownIncompatible: UInt64 = 0x1F

    public static let lazyRefcounts: UInt64 = 1 << 0

    public static let autoclearBitmaps: UInt64 = 1 << 0
}

/// One entry of the feature name table extension (48 bytes).
public struct FeatureName: Equatable, Sendable {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    public var type: UInt8
    public var bit: UInt8
    public var name: String

    public init(type: UInt8, bit: UInt8, name: String) {
        self.type = type
        self.bit = bit
        self.name = name
    }

    public static let entrySize = 48

    /// Whether QEMU writes the table into a v3 image with clusters of `clusterSize` bytes:
    /// only above 4 KiB (observed with qemu-img 7.2: 512 B and 4 KiB images have none,
    /// 8 KiB and larger have it), leaving small header clusters room for a backing name.
    public static func tableWritten(clusterSize: Int) -> Bool { clusterSize > 4096 }

    /// The table QEMU 7.2 writes into every v3 image whose clusters are larger than 4 KiB.
    public static let qemuDefault: [FeatureName] = [
        .init(type: 0, bit: 0, name: "dirty bit"),
        .init(type: 0, bit: 1, name: "corrupt bit"),
        .init(type: 0, bit: 2, name: "external data file"),
        .init(type: 0, bit: 3, name: "compression type"),
        .init(type: 0, bit: 4, name: "extended L2 entries"),
        .init(type: 1, bit: 0, name: "lazy refcounts"),
        .init(type: 2, bit: 0, name: "bitmaps"),
        .init(type: 2, bit: 1, name: "raw external data"),
    ]
}
