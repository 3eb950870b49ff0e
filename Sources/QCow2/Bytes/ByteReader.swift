/// Bounds-checked big-endian loads over a byte buffer. Every load throws
/// `FormatError` instead of trapping when the field would run past the end.
public struct ByteReader {
    public let bytes: [UInt8]
    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var count: Int { bytes.count }

    @inline(__always)
    func check(_ offset: Int, _ size: Int, _ field: String) throws(FormatError) {
        guard offset >= 0, size >= 0, offset <= bytes.count, bytes.count - offset >= size else {
            throw FormatError(field, "truncated (needs \(size) bytes at offset \(offset), have \(bytes.count))")
        }
    }

    public func u8(_ offset: Int, _ field: String) throws(FormatError) -> UInt8 {
        try check(offset, 1, field)
        return bytes[offset]
    }

    public func u16(_ offset: Int, _ field: String) throws(FormatError) -> UInt16 {
        try check(offset, 2, field)
        return UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
    }

    public func u32(_ offset: Int, _ field: String) throws(FormatError) -> UInt32 {
        try check(offset, 4, field)
        return bytes.withUnsafeBytes { UInt32(bigEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
    }

    public func u64(_ offset: Int, _ field: String) throws(FormatError) -> UInt64 {
        try check(offset, 8, field)
        return bytes.withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
    }

    public func slice(_ offset: Int, _ size: Int, _ field: String) throws(FormatError) -> ArraySlice<UInt8> {
        try check(offset, size, field)
        return bytes[offset..<(offset + size)]
    }
}

/// Big-endian decoding of a whole table of 64-bit entries.
func decodeBigEndianU64(_ raw: UnsafeRawBufferPointer, into out: inout [UInt64]) {
    let n = raw.count / 8
    out.removeAll(keepingCapacity: true)
    out.reserveCapacity(n)
    for i in 0..<n {
        out.append(UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)))
    }
}
