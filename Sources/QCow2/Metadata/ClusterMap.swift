/// Guest offset → host cluster: the active L1 table (in memory), L2 tables through a
/// capped cache, the entry codec, the extent query, and the checks a writer makes on an
/// entry before it acts on it. It reads only: L1 and L2 changes reach the disk through
/// `MetadataTransaction` (`publishL2`, `setL1Entry`, `clearL1`), which keeps this map's
/// memory in step.
final class ClusterMap {
    let path: String
    let file: BlockFile
    let geometry: Geometry
    /// Where the L1 table is (the header's l1_table_offset) and the disk size.
    let headers: HeaderStore
    var l1Table: [UInt64]
    let l2Cache: TableCache
    /// Length of the host file (refreshed by writers).
    var fileSize: UInt64

    init(headers: HeaderStore, l1Table: [UInt64], fileSize: UInt64, cacheBytes: Int) {
        self.path = headers.path
        self.file = headers.file
        self.geometry = headers.geometry
        self.headers = headers
        self.l1Table = l1Table
        self.fileSize = fileSize
        self.l2Cache = TableCache(tableBytes: headers.geometry.clusterSize, budget: cacheBytes)
    }

    var virtualSize: UInt64 { headers.header.size & ~UInt64(511) }
    /// Data clusters live in an external data file (offset 0 can then be allocated).
    var externalData: Bool { headers.header.incompatibleFeatures & Features.externalDataFile != 0 }

    // MARK: Lookups

    /// Whether host `offset` lies inside the file. A writer refreshes `fileSize` before
    /// saying no: a write request that failed after growing the file (an I/O error while
    /// freeing, after its new L2 table was already in use) leaves it stale, and the next
    /// request must not take its own new table for corruption.
    func isInsideFile(_ offset: UInt64) throws -> Bool {
        if offset < fileSize { return true }
        guard file.writable else { return false }
        fileSize = try file.size()
        return offset < fileSize
    }

    /// Loads the L2 table at `offset` through the cache.
    func l2Table(at offset: UInt64, l1Index: Int) throws -> [UInt8] {
        guard geometry.isAligned(offset) else {
            throw QCow2Error.malformed(path: path, field: "L1 entry \(l1Index)", detail: "L2 table offset 0x\(hex(offset)) is not cluster-aligned")
        }
        guard try isInsideFile(offset) else {
            throw QCow2Error.malformed(path: path, field: "L1 entry \(l1Index)", detail: "L2 table offset 0x\(hex(offset)) lies beyond the end of the file")
        }
        let f = file
        return try l2Cache.table(at: offset) { (buf: inout [UInt8]) throws in
            try buf.withUnsafeMutableBytes { (b: UnsafeMutableRawBufferPointer) throws in
                try f.read(into: b, at: offset)
            }
        }
    }

    @inline(__always)
    func l2Entry(_ table: [UInt8], _ index: Int) -> L2Entry {
        table.withUnsafeBytes { b in
            if geometry.extendedL2 {
                let o = index * 16
                return L2Entry(UInt64(bigEndian: b.loadUnaligned(fromByteOffset: o, as: UInt64.self)),
                               bitmap: UInt64(bigEndian: b.loadUnaligned(fromByteOffset: o + 8, as: UInt64.self)))
            }
            return L2Entry(UInt64(bigEndian: b.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self)))
        }
    }

    func setL2Entry(_ table: inout [UInt8], _ i: Int, _ e: L2Entry) {
        table.withUnsafeMutableBytes { b in
            if geometry.extendedL2 {
                b.storeBytes(of: e.raw.bigEndian, toByteOffset: i * 16, as: UInt64.self)
                b.storeBytes(of: e.bitmap.bigEndian, toByteOffset: i * 16 + 8, as: UInt64.self)
            } else {
                b.storeBytes(of: e.raw.bigEndian, toByteOffset: i * 8, as: UInt64.self)
            }
        }
    }

    /// Host clusters an entry references (for freeing).
    func referencedClusters(_ e: L2Entry) -> [UInt64] {
        let cb = UInt64(geometry.clusterBits)
        if e.isCompressed {
            let r = e.compressedHostRange(clusterBits: geometry.clusterBits)
            return Array(stride(from: r.start >> cb, to: (r.end + (UInt64(1) << cb) - 1) >> cb, by: 1))
        }
        return e.hostOffset != 0 ? [e.hostOffset >> cb] : []
    }

    // MARK: The extent query

    /// The run at `offset` (inside the disk) whose (sub)clusters have the same kind and,
    /// for data, contiguous host offsets; never past the range of one L2 table.
    func layerExtent(at offset: UInt64, maxLength: UInt64) throws -> LayerExtent {
        let g = geometry
        let limit = min(maxLength, virtualSize - offset)
        // Never cross the end of one L2 table's range.
        let l2End = (offset | (g.bytesPerL2 - 1)) &+ 1  // cannot overflow: offset < size < 2^63
        let span = min(limit, l2End - offset)
        let l1i = g.l1Index(offset)
        guard l1i < l1Table.count else { return LayerExtent(length: span, descriptor: .unallocated(host: nil)) }
        let l2Offset = L1Entry(l1Table[l1i]).l2Offset
        if l2Offset == 0 { return LayerExtent(length: span, descriptor: .unallocated(host: nil)) }
        let table = try l2Table(at: l2Offset, l1Index: l1i)

        let unit = UInt64(1) << UInt64(g.subclusterBits)
        var index = g.l2Index(offset)
        var sub = g.extendedL2 ? Int((offset >> UInt64(g.subclusterBits)) & 31) : 0
        let inUnit = offset & (unit - 1)
        func describe(_ idx: Int, _ s: Int) throws -> ClusterDescriptor {
            do { return try l2Entry(table, idx).descriptor(geometry: g, subcluster: s, externalData: externalData) } catch {
                throw QCow2Error.malformed(path: path, field: "L2 entry \(idx) of table 0x\(hex(l2Offset))", detail: error.detail)
            }
        }
        let first = try describe(index, sub)
        let start: ClusterDescriptor
        switch first {
        case .normal(let h): start = .normal(host: h + inUnit)
        case .zero(let h?): start = .zero(host: h + inUnit)
        case .unallocated(let h?): start = .unallocated(host: h + inUnit)
        case .compressed:
            // One cluster at a time: each has its own stream.
            let rest = UInt64(g.clusterSize) - g.offsetInCluster(offset)
            return LayerExtent(length: min(span, rest), descriptor: first)
        default: start = first
        }
        var length = unit - inUnit
        var expect = first
        while length < span {
            // Advance one unit.
            if g.extendedL2 {
                sub += 1
                if sub == 32 { sub = 0; index += 1 }
            } else {
                index += 1
            }
            if index >= g.l2Entries { break }
            let next = try describe(index, sub)
            guard Self.continues(expect, with: next, unit: unit) else { break }
            expect = next
            length += unit
        }
        return LayerExtent(length: min(length, span), descriptor: start)
    }

    /// Whether unit `next` continues the run whose last unit is `last`: the same kind and,
    /// where there is a host offset, the next one.
    static func continues(_ last: ClusterDescriptor, with next: ClusterDescriptor, unit: UInt64) -> Bool {
        switch (last, next) {
        case (.normal(let a), .normal(let b)): return b == a + unit
        case (.zero(nil), .zero(nil)), (.unallocated(nil), .unallocated(nil)): return true
        case (.zero(let a?), .zero(let b?)), (.unallocated(let a?), .unallocated(let b?)): return b == a + unit
        default: return false
        }
    }

    // MARK: Before a write

    /// The L2 table for writing guest range `l1i`: its bytes, its offset (nil when a new
    /// table must be allocated), and the shared table it replaces (copy-on-write).
    func l2TableForWrite(_ l1i: Int, refcounts: Allocator) throws -> (table: [UInt8], offset: UInt64?, replaces: UInt64?) {
        let l1e = L1Entry(l1Table[l1i])
        let l2 = l1e.l2Offset
        if l2 == 0 { return ([UInt8](repeating: 0, count: geometry.clusterSize), nil, nil) }
        let table = try l2Table(at: l2, l1Index: l1i)
        let tableRefcount = try refcounts.refcount(l2 >> UInt64(geometry.clusterBits))
        if l1e.isCopied || tableRefcount <= 1 {
            return (table, l2, nil)
        }
        // Shared with a snapshot: copy it. A data cluster's refcount counts the L2 tables
        // reaching it per L1, so it is unchanged (the old table now serves the snapshot
        // alone, the copy the active L1); but every such cluster is shared, so the copy's
        // COPIED flags are cleared.
        var copy = table
        for i in 0..<geometry.l2Entries {
            let e = l2Entry(table, i)
            if !e.isCompressed && e.hostOffset != 0 && e.isCopied {
                setL2Entry(&copy, i, L2Entry(e.raw & ~L2Entry.copied, bitmap: e.bitmap))
            }
        }
        return (copy, nil, l2)
    }

    /// Refuses to act on an entry QEMU would consider corrupt: bad descriptors, and
    /// "owned" (COPIED) clusters whose refcount is not 1 — writing there in place
    /// could overwrite other data or metadata.
    func validateForWrite(_ e: L2Entry, index: Int, table: UInt64, refcounts: Allocator) throws {
        let g = geometry
        do {
            for sub in 0..<(g.extendedL2 && !e.isCompressed ? 32 : 1) {
                _ = try e.descriptor(geometry: g, subcluster: sub)
            }
        } catch {
            throw QCow2Error.malformed(path: path, field: "L2 entry \(index) of table 0x\(hex(table))", detail: error.detail)
        }
        if !e.isCompressed && e.isCopied && e.hostOffset != 0 {
            let rc = try refcounts.refcount(e.hostOffset >> UInt64(g.clusterBits))
            guard rc == 1 else {
                throw QCow2Error.malformed(path: path, field: "L2 entry \(index) of table 0x\(hex(table))",
                                           detail: "cluster 0x\(hex(e.hostOffset)) is marked as owned but its refcount is \(rc)")
            }
        }
    }
}
