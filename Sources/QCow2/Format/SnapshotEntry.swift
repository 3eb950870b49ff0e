/// One entry of the internal snapshot table (spec "Snapshots").
public struct SnapshotEntry: Equatable, Sendable {
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    public var id: String
    public var name: String
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32
    public var vmClockNanoseconds: UInt64
    public var vmStateSize32: UInt32
    public var extraData: [UInt8]

    public static let maxSnapshots: UInt32 = 65536
    public static let maxTableBytes: UInt64 = 64 * 1024 * 1024
    public static let maxExtraData = 1024

    /// VM state size: the 64-bit field in extra data when present, else the 32-bit one.
    public var vmStateSize: UInt64 {
        if extraData.count >= 8, let v = try? ByteReader(extraData).u64(0, "vm_state_size") { return v }
        return UInt64(vmStateSize32)
    }
    /// Virtual disk size at snapshot time, when recorded.
    public var diskSize: UInt64? {
        extraData.count >= 16 ? (try? ByteReader(extraData).u64(8, "disk_size")) : nil
    }
    /// Instruction count (-1 when icount was off), when recorded.
    public var icount: Int64? {
        guard extraData.count >= 24, let v = try? ByteReader(extraData).u64(16, "icount") else { return nil }
        return Int64(bitPattern: v)
    }

    /// Bytes the fixed part occupies; the entry continues with extra data, id and name.
    public static let fixedSize = 40

    /// The unpadded size of an entry, from its 40-byte fixed part.
    public static func entrySize(fixedPart r: ByteReader) throws(FormatError) -> Int {
        let idLen = Int(try r.u16(12, "snapshot id length"))
        let nameLen = Int(try r.u16(14, "snapshot name length"))
        let extraLen = Int(try r.u32(36, "snapshot extra data size"))
        guard extraLen <= maxExtraData else {
            throw FormatError("snapshot extra data size", "\(extraLen) is too large (at most \(maxExtraData))")
        }
        return fixedSize + extraLen + idLen + nameLen
    }

    /// Parses one entry from `r` at `offset`; returns the entry and its padded size.
    public static func parse(_ r: ByteReader, at offset: Int, version: UInt32) throws(FormatError) -> (SnapshotEntry, Int) {
        let l1 = try r.u64(offset, "snapshot L1 table offset")
        let l1Size = try r.u32(offset + 8, "snapshot L1 size")
        let idLen = Int(try r.u16(offset + 12, "snapshot id length"))
        let nameLen = Int(try r.u16(offset + 14, "snapshot name length"))
        let dateS = try r.u32(offset + 16, "snapshot date")
        let dateNs = try r.u32(offset + 20, "snapshot date")
        let clock = try r.u64(offset + 24, "snapshot vm clock")
        let vmState = try r.u32(offset + 32, "snapshot vm state size")
        let extraLen = Int(try r.u32(offset + 36, "snapshot extra data size"))
        guard extraLen <= maxExtraData else {
            throw FormatError("snapshot extra data size", "\(extraLen) is too large (at most \(maxExtraData))")
        }
        if version >= 3 && extraLen < 16 {
            throw FormatError("snapshot extra data size", "\(extraLen) is too small for a v3 image (at least 16)")
        }
        var o = offset + fixedSize
        let extra = Array(try r.slice(o, extraLen, "snapshot extra data"))
        o += extraLen
        let id = String(decoding: try r.slice(o, idLen, "snapshot id"), as: UTF8.self)
        o += idLen
        let name = String(decoding: try r.slice(o, nameLen, "snapshot name"), as: UTF8.self)
        o += nameLen
        let size = ((o - offset) + 7) & ~7
        let e = SnapshotEntry(l1TableOffset: l1, l1Size: l1Size, id: id, name: name, dateSeconds: dateS,
                              dateNanoseconds: dateNs, vmClockNanoseconds: clock, vmStateSize32: vmState,
                              extraData: extra)
        return (e, size)
    }
}
