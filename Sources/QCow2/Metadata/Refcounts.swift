/// Read access to the refcount structure: the refcount table (held in memory,
/// at most 8 MiB) and refcount blocks through a capped cache.
final class RefcountReader {
    let image: QCow2Image
    let table: [UInt64]
    let cache: TableCache

    static let offsetMask: UInt64 = 0xFFFF_FFFF_FFFF_FE00

    init(image: QCow2Image, cacheBytes: Int = 4 * 1024 * 1024) throws {
        self.image = image
        let h = image.header
        let bytes = Int(h.refcountTableClusters) << image.geometry.clusterBits
        let raw = try image.file.read(count: bytes, at: h.refcountTableOffset)
        var t: [UInt64] = []
        raw.withUnsafeBytes { decodeBigEndianU64($0, into: &t) }
        self.table = t
        self.cache = TableCache(tableBytes: image.geometry.clusterSize, budget: cacheBytes)
    }

    /// Refcount of host cluster `index`; 0 where no refcount block covers it.
    func refcount(ofCluster index: UInt64) throws -> UInt64 {
        let g = image.geometry
        let ti = index >> UInt64(g.refblockBits)
        guard ti < UInt64(table.count) else { return 0 }
        let blockOffset = table[Int(ti)] & Self.offsetMask
        if blockOffset == 0 { return 0 }
        guard g.isAligned(blockOffset), blockOffset < Geometry.maxHostOffset else {
            throw QCow2Error.malformed(path: image.path, field: "refcount table entry \(ti)",
                                       detail: "refcount block offset 0x\(hex(blockOffset)) is invalid")
        }
        let i = Int(index & ((1 << UInt64(g.refblockBits)) - 1))
        // Most lookups hit the block of the previous one (sequential scans).
        if blockOffset == lastOffset { return Self.entry(lastBlock, i, order: g.refcountOrder) }
        let f = image.file
        let block = try cache.table(at: blockOffset) { (buf: inout [UInt8]) throws in
            try buf.withUnsafeMutableBytes { try f.read(into: $0, at: blockOffset) }
        }
        lastOffset = blockOffset
        lastBlock = block
        return Self.entry(block, i, order: g.refcountOrder)
    }

    private var lastOffset: UInt64 = 0
    private var lastBlock: [UInt8] = []

    /// Decodes entry `i` of a refcount block (sub-byte entries are LSB first).
    static func entry(_ block: [UInt8], _ i: Int, order: Int) -> UInt64 {
        switch order {
        case 0, 1, 2:
            let bits = 1 << order
            let bitIndex = i * bits
            let byte = block[bitIndex >> 3]
            return UInt64((byte >> UInt8(bitIndex & 7)) & UInt8((1 << bits) - 1))
        case 3: return UInt64(block[i])
        case 4: return UInt64(block[2 * i]) << 8 | UInt64(block[2 * i + 1])
        case 5:
            return block.withUnsafeBytes { UInt64(UInt32(bigEndian: $0.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))) }
        default:
            return block.withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self)) }
        }
    }

    /// Number of host clusters below `fileLength` with a non-zero refcount,
    /// counting no further than `stopAt`.
    func countUsedClusters(fileLength: UInt64, stopAt: Int64) throws -> Int64 {
        let g = image.geometry
        let n = g.clusters(forBytes: fileLength)
        var count: Int64 = 0
        var i: UInt64 = 0
        while i < n && count < stopAt {
            let ti = i >> UInt64(g.refblockBits)
            if ti >= UInt64(table.count) { break }
            if table[Int(ti)] & Self.offsetMask == 0 {
                i = (ti + 1) << UInt64(g.refblockBits)
                continue
            }
            if try refcount(ofCluster: i) != 0 { count += 1 }
            i += 1
        }
        return count
    }
}
