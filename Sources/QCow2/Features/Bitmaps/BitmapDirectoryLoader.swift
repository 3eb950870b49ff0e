/// Open-time validation of the bitmap directory: every constraint QEMU checks (count,
/// names, flags, granularity, table sizes by formula) and every bitmap table entry.
extension ImageValidator {
    static func loadBitmapDirectory(path: String, file: BlockFile, ext: BitmapsExtension, header h: Header, g: Geometry, fileSize: UInt64) throws -> [BitmapDirectoryEntry] {
        let f = "bitmaps extension"
        guard ext.nbBitmaps > 0 else { throw QCow2Error.malformed(path: path, field: f, detail: "it declares zero bitmaps") }
        guard ext.nbBitmaps <= BitmapsExtension.maxBitmaps else {
            throw QCow2Error.malformed(path: path, field: f, detail: "\(ext.nbBitmaps) bitmaps is too many (at most 65535)")
        }
        guard ext.reserved == 0 else { throw QCow2Error.malformed(path: path, field: f, detail: "the reserved field is not zero") }
        guard ext.directorySize > 0, ext.directorySize <= BitmapsExtension.maxDirectorySize else {
            throw QCow2Error.malformed(path: path, field: "bitmap directory size", detail: "\(ext.directorySize) is out of range")
        }
        try checkTable(path, "bitmap directory offset", ext.directoryOffset, bytes: ext.directorySize, g: g, fileSize: fileSize)
        guard h.version >= 3 else { throw QCow2Error.malformed(path: path, field: f, detail: "bitmaps need a version 3 image") }
        let dir = try file.read(count: Int(ext.directorySize), at: ext.directoryOffset)
        let r = ByteReader(dir)
        var out: [BitmapDirectoryEntry] = []
        var pos = 0
        var names = Set<String>()
        while pos < dir.count {
            let (e, size): (BitmapDirectoryEntry, Int)
            do { (e, size) = try BitmapDirectoryEntry.parse(r, at: pos) } catch {
                throw QCow2Error.malformed(path: path, field: "bitmap directory", detail: "broken directory (\(error.field): \(error.detail))")
            }
            pos += size
            out.append(e)
            guard out.count <= Int(ext.nbBitmaps) else { break }
            let who = "bitmap '\(e.name)'"
            guard e.type == 1 else { throw QCow2Error.malformed(path: path, field: who, detail: "unknown bitmap type \(e.type)") }
            guard (9...31).contains(Int(e.granularityBits)) else {
                throw QCow2Error.malformed(path: path, field: who, detail: "granularity bits \(e.granularityBits) out of range (9..31)")
            }
            guard !e.name.isEmpty, e.name.utf8.count <= BitmapDirectoryEntry.maxNameSize else {
                throw QCow2Error.malformed(path: path, field: who, detail: "name length out of range (1..1023)")
            }
            guard e.extraData.isEmpty else { throw QCow2Error.malformed(path: path, field: who, detail: "bitmap extra data is not supported") }
            guard e.flags & ~BitmapDirectoryEntry.knownFlags == 0 else {
                throw QCow2Error.malformed(path: path, field: who, detail: "unknown flags 0x\(hex(e.flags))")
            }
            guard names.insert(e.name).inserted else { throw QCow2Error.malformed(path: path, field: who, detail: "duplicate bitmap name") }
            guard UInt64(e.tableSize) <= BitmapDirectoryEntry.maxTableEntries,
                  UInt64(e.tableSize) << UInt64(g.clusterBits) <= BitmapDirectoryEntry.maxDataBytes else {
                throw QCow2Error.malformed(path: path, field: who, detail: "bitmap table of \(e.tableSize) entries is too large")
            }
            try checkTable(path, "\(who) table offset", e.tableOffset, bytes: max(1, UInt64(e.tableSize) * 8), g: g, fileSize: fileSize)
            guard e.tableOffset != 0 else { throw QCow2Error.malformed(path: path, field: who, detail: "table offset is zero") }
            if !e.inUse {
                let want = BitmapDirectoryEntry.tableSize(diskSize: h.size, granularityBits: Int(e.granularityBits), clusterSize: g.clusterSize)
                guard UInt64(e.tableSize) == want else {
                    throw QCow2Error.malformed(path: path, field: who, detail: "table size \(e.tableSize) does not match the disk size (expected \(want))")
                }
                try validateBitmapTable(path: path, file: file, entry: e, g: g, fileSize: fileSize)
            }
        }
        guard pos == dir.count, out.count == Int(ext.nbBitmaps) else {
            throw QCow2Error.malformed(path: path, field: "bitmap directory",
                             detail: "found \(out.count) bitmaps in \(pos) bytes, the extension declares \(ext.nbBitmaps) in \(dir.count)")
        }
        return out
    }

    /// Reads a bitmap table in chunks and checks every entry (reserved bits, alignment).
    static func validateBitmapTable(path: String, file: BlockFile, entry e: BitmapDirectoryEntry, g: Geometry, fileSize: UInt64) throws {
        let chunkEntries = 8192
        var done = 0
        let total = Int(e.tableSize)
        var words: [UInt64] = []
        while done < total {
            let n = min(chunkEntries, total - done)
            let raw = try file.read(count: n * 8, at: e.tableOffset + UInt64(done * 8))
            raw.withUnsafeBytes { decodeBigEndianU64($0, into: &words) }
            for (i, w) in words.enumerated() {
                let off = w & 0x00FF_FFFF_FFFF_FE00
                if w & 0xFF00_0000_0000_01FE != 0 || (off != 0 && w & 1 != 0) || !g.isAligned(off) {
                    throw QCow2Error.malformed(path: path, field: "bitmap '\(e.name)' table",
                                     detail: "invalid entry \(done + i) (0x\(hex(w)))")
                }
            }
            done += n
        }
    }
}
