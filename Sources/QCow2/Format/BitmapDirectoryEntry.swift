/// One bitmap directory entry (spec "Bitmap directory").
public struct BitmapDirectoryEntry: Equatable, Sendable {
    public var tableOffset: UInt64
    public var tableSize: UInt32
    public var flags: UInt32
    public var type: UInt8
    public var granularityBits: UInt8
    public var name: String
    public var extraData: [UInt8]

    public static let flagInUse: UInt32 = 1 << 0
    public static let flagAuto: UInt32 = 1 << 1
    public static let knownFlags: UInt32 = 0x3
    public static let maxNameSize = 1023
    public static let maxTableEntries: UInt64 = 0x800_0000
    public static let maxDataBytes: UInt64 = 512 * 1024 * 1024

    public var inUse: Bool { flags & Self.flagInUse != 0 }
    public var isAuto: Bool { flags & Self.flagAuto != 0 }
    public var granularity: UInt64 { UInt64(1) << UInt64(granularityBits) }

    /// Table entries QEMU requires for a disk of `size` bytes (spec formula).
    public static func tableSize(diskSize size: UInt64, granularityBits: Int, clusterSize: Int) -> UInt64 {
        let g = UInt64(1) << UInt64(granularityBits)
        let bits = size / g + (size % g != 0 ? 1 : 0)
        let bytes = bits / 8 + (bits % 8 != 0 ? 1 : 0)
        let cs = UInt64(clusterSize)
        return bytes / cs + (bytes % cs != 0 ? 1 : 0)
    }

    /// Parses the entry at `offset`; returns it and its padded size.
    public static func parse(_ r: ByteReader, at offset: Int) throws(FormatError) -> (BitmapDirectoryEntry, Int) {
        let tableOffset = try r.u64(offset, "bitmap table offset")
        let tableSize = try r.u32(offset + 8, "bitmap table size")
        let flags = try r.u32(offset + 12, "bitmap flags")
        let type = try r.u8(offset + 16, "bitmap type")
        let gbits = try r.u8(offset + 17, "bitmap granularity")
        let nameSize = Int(try r.u16(offset + 18, "bitmap name size"))
        let extraSize = Int(try r.u32(offset + 20, "bitmap extra data size"))
        guard extraSize <= 1 << 20 else {
            throw FormatError("bitmap extra data size", "\(extraSize) is too large")
        }
        let extra = Array(try r.slice(offset + 24, extraSize, "bitmap extra data"))
        let nameBytes = try r.slice(offset + 24 + extraSize, nameSize, "bitmap name")
        let size = (24 + extraSize + nameSize + 7) & ~7
        let e = BitmapDirectoryEntry(tableOffset: tableOffset, tableSize: tableSize, flags: flags, type: type,
                                     granularityBits: gbits, name: String(decoding: nameBytes, as: UTF8.self),
                                     extraData: extra)
        return (e, size)
    }

    /// Appends the entry, padded to a multiple of 8 bytes.
    public func serialize(into out: inout [UInt8]) {
        var w = ByteWriter()
        let name = Array(name.utf8)
        w.u64(tableOffset); w.u32(tableSize); w.u32(flags); w.u8(type); w.u8(granularityBits)
        w.u16(UInt16(name.count)); w.u32(UInt32(extraData.count))
        w.bytes += extraData
        w.bytes += name
        w.zeros(((w.bytes.count + 7) & ~7) - w.bytes.count)
        out += w.bytes
    }
}
