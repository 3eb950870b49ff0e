/// The bitmaps header extension (type 0x23852875, exactly 24 bytes).
public struct BitmapsExtension: Equatable, Sendable {
    public var nbBitmaps: UInt32
    public var reserved: UInt32
    public var directorySize: UInt64
    public var directoryOffset: UInt64
    public static let maxBitmaps: UInt32 = 65535
    public static let maxDirectorySize: UInt64 = 1024 * 65535
}

/// One header extension. Known kinds are typed; unknown ones are kept verbatim.
public enum HeaderExtension: Equatable, Sendable {
    case backingFormat(String)
    case featureNameTable([FeatureName])
    case bitmaps(BitmapsExtension)
    case fullDiskEncryption(offset: UInt64, length: UInt64)
    case externalDataFile(String)
    case unknown(type: UInt32, data: [UInt8])

    public static let typeEnd: UInt32 = 0
    public static let typeBackingFormat: UInt32 = 0xE279_2ACA
    public static let typeFeatureNameTable: UInt32 = 0x6803_F857
    public static let typeBitmaps: UInt32 = 0x2385_2875
    public static let typeFullDiskEncryption: UInt32 = 0x0537_BE77
    public static let typeExternalDataFile: UInt32 = 0x4441_5441

    /// Parses the extension list in `bytes[start..<end]`. A list that reaches `end`
    /// without an end marker is accepted, as QEMU does.
    public static func parseList(_ r: ByteReader, start: Int, end: Int) throws(FormatError) -> [HeaderExtension] {
        var out: [HeaderExtension] = []
        var seen = Set<UInt32>()
        var off = start
        let end = min(end, r.count)
        while off + 8 <= end {
            let type = try r.u32(off, "header extension type")
            let len = try r.u32(off + 4, "header extension length")
            if type == typeEnd { break }
            let dataStart = off + 8
            guard Int(len) <= end - dataStart else {
                throw FormatError("header extension 0x\(hex(type))",
                                  "length \(len) runs past the end of the header area (\(end) bytes)")
            }
            let data = try r.slice(dataStart, Int(len), "header extension")
            if type != 0 && seen.contains(type) && type != typeFeatureNameTable {
                throw FormatError("header extension 0x\(hex(type))", "appears more than once")
            }
            seen.insert(type)
            out.append(try parseOne(type: type, data: Array(data)))
            let padded = (Int(len) + 7) & ~7
            off = dataStart + padded
        }
        return out
    }

    static func parseOne(type: UInt32, data: [UInt8]) throws(FormatError) -> HeaderExtension {
        let r = ByteReader(data)
        switch type {
        case typeBackingFormat:
            return .backingFormat(String(decoding: data, as: UTF8.self))
        case typeExternalDataFile:
            return .externalDataFile(String(decoding: data, as: UTF8.self))
        case typeFeatureNameTable:
            var names: [FeatureName] = []
            var o = 0
            while o + FeatureName.entrySize <= data.count {
                let raw = data[(o + 2)..<(o + FeatureName.entrySize)]
                let nameBytes = raw.prefix { $0 != 0 }
                names.append(FeatureName(type: data[o], bit: data[o + 1],
                                         name: String(decoding: nameBytes, as: UTF8.self)))
                o += FeatureName.entrySize
            }
            return .featureNameTable(names)
        case typeBitmaps:
            guard data.count == 24 else {
                throw FormatError("bitmaps extension", "invalid extension length \(data.count) (must be 24)")
            }
            let e = BitmapsExtension(nbBitmaps: try r.u32(0, "nb_bitmaps"), reserved: try r.u32(4, "reserved"),
                                     directorySize: try r.u64(8, "bitmap_directory_size"),
                                     directoryOffset: try r.u64(16, "bitmap_directory_offset"))
            return .bitmaps(e)
        case typeFullDiskEncryption:
            guard data.count == 16 else {
                throw FormatError("full disk encryption extension", "invalid extension length \(data.count)")
            }
            return .fullDiskEncryption(offset: try r.u64(0, "FDE offset"), length: try r.u64(8, "FDE length"))
        default:
            return .unknown(type: type, data: data)
        }
    }

    public var type: UInt32 {
        switch self {
        case .backingFormat: return Self.typeBackingFormat
        case .featureNameTable: return Self.typeFeatureNameTable
        case .bitmaps: return Self.typeBitmaps
        case .fullDiskEncryption: return Self.typeFullDiskEncryption
        case .externalDataFile: return Self.typeExternalDataFile
        case .unknown(let t, _): return t
        }
    }

    /// The payload bytes (without type, length and padding).
    public var payload: [UInt8] {
        var w = ByteWriter()
        switch self {
        case .backingFormat(let s), .externalDataFile(let s): w.bytes = Array(s.utf8)
        case .featureNameTable(let names):
            for n in names {
                w.u8(n.type); w.u8(n.bit)
                let b = Array(n.name.utf8.prefix(46))
                w.bytes.append(contentsOf: b)
                w.zeros(46 - b.count)
            }
        case .bitmaps(let e):
            w.u32(e.nbBitmaps); w.u32(e.reserved); w.u64(e.directorySize); w.u64(e.directoryOffset)
        case .fullDiskEncryption(let o, let l): w.u64(o); w.u64(l)
        case .unknown(_, let d): w.bytes = d
        }
        return w.bytes
    }

    /// Serializes the list followed by the 8-byte end marker.
    public static func serialize(_ list: [HeaderExtension], into out: inout [UInt8]) {
        var w = ByteWriter()
        for e in list {
            let p = e.payload
            w.u32(e.type); w.u32(UInt32(p.count))
            w.bytes.append(contentsOf: p)
            w.zeros(((p.count + 7) & ~7) - p.count)
        }
        w.zeros(8)
        out.append(contentsOf: w.bytes)
    }
}

func hex<T: BinaryInteger>(_ v: T) -> String { String(v, radix: 16) }
