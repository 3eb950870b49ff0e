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

extension SnapshotEntry {
    /// A new entry as QEMU 7.2 writes one: 24 bytes of extra data (64-bit VM state size,
    /// disk size, icount), for version 2 images too.
    public init(id: String, name: String, l1TableOffset: UInt64, l1Size: UInt32, diskSize: UInt64,
                dateSeconds: UInt32, dateNanoseconds: UInt32, vmClockNanoseconds: UInt64 = 0,
                vmStateSize: UInt64 = 0, icount: Int64 = 0) {
        var w = ByteWriter()
        w.u64(vmStateSize); w.u64(diskSize); w.u64(UInt64(bitPattern: icount))
        self.init(l1TableOffset: l1TableOffset, l1Size: l1Size, id: id, name: name, dateSeconds: dateSeconds,
                  dateNanoseconds: dateNanoseconds, vmClockNanoseconds: vmClockNanoseconds,
                  vmStateSize32: UInt32(truncatingIfNeeded: vmStateSize), extraData: w.bytes)
    }

    /// Bytes the entry takes in the table, padding included.
    public var paddedSize: Int { (Self.fixedSize + extraData.count + id.utf8.count + name.utf8.count + 7) & ~7 }

    /// The entry's bytes, padded to a multiple of 8 (spec "Snapshots"). Id and name
    /// must fit their 16-bit lengths (`SnapshotTable` checks).
    public func serialize(into out: inout [UInt8]) {
        var w = ByteWriter()
        let idBytes = Array(id.utf8), nameBytes = Array(name.utf8)
        w.u64(l1TableOffset); w.u32(l1Size)
        w.u16(UInt16(truncatingIfNeeded: idBytes.count)); w.u16(UInt16(truncatingIfNeeded: nameBytes.count))
        w.u32(dateSeconds); w.u32(dateNanoseconds); w.u64(vmClockNanoseconds); w.u32(vmStateSize32)
        w.u32(UInt32(extraData.count))
        w.bytes += extraData + idBytes + nameBytes
        w.zeros((8 - w.bytes.count % 8) % 8)
        out += w.bytes
    }
}
