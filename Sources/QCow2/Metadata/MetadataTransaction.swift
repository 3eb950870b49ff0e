/// One change of qcow2 metadata in the crash-safe order, written in one place:
///
/// 1. refcounts: clusters the change allocates get refcount 1 and are made durable
///    (`allocate`, `commitRefcounts`) before anything points at them;
/// 2. data: the caller fills the new clusters (and writes in place where the image owns
///    a cluster alone);
/// 3. publication: a new L2 table is written whole and made durable, then the one L1
///    entry that points at it; or changed entries of an existing table are written after
///    a barrier that makes the data durable first (`publishL2`);
/// 4. frees: clusters nothing references any more lose their reference, last (`finish`).
///
/// A crash between any two steps leaves at worst leaked clusters, never a reference to a
/// cluster whose refcount is 0 or whose content is not yet written. Every write of qcow2
/// metadata is here (or, for refcount blocks, in the `Allocator` when this type commits
/// refcounts): L1/L2 entries and tables, header fields and the whole header cluster, the
/// refcount table's entries and its move, new directories and tables, and every repair
/// of `check -r` (refcount corrections, the refcount rebuild, COPIED flags). Guest data
/// is the caller's (step 2).
struct MetadataTransaction {
    let image: QCow2Image
    /// Replaced by `publishRefcountStructure` (the rebuilt structure has its own allocator).
    private(set) var alloc: Allocator
    private var frees: [UInt64] = []

    init(_ image: QCow2Image) throws {
        self.image = image
        self.alloc = try image.requireAllocator()
    }

    // MARK: 1. Refcounts

    /// `n` contiguous new clusters (refcount 1 once `commitRefcounts` returns).
    func allocate(_ n: Int) throws -> UInt64 { try alloc.allocate(n) }

    /// Cluster `c` (index) if it is free, allocated; false if it is in use.
    func allocateIfFree(_ c: UInt64) throws -> Bool { try alloc.allocateIfFree(c) }

    /// One more reference to cluster `c` (index): a compressed cluster packed into it.
    func addReference(_ c: UInt64) throws { try alloc.increment(c) }

    /// The refcount of cluster `c` (index) as this change sees it.
    func refcount(_ c: UInt64) throws -> UInt64 { try alloc.refcount(c) }

    /// Makes the refcounts of everything allocated so far durable.
    func commitRefcounts() throws { try alloc.commit() }

    /// Sets the refcount of cluster `c` (index) to what a check counted (`check -r`:
    /// a leak released or a missing reference added); durable with `commitRefcounts`.
    func correctRefcount(_ c: UInt64, to v: UInt64) throws { try alloc.forceRefcount(c, v) }

    // MARK: 2. New metadata

    /// Metadata this change creates (a table, a directory) in clusters it allocated:
    /// written and (unless `durable` is false: the caller batches several and calls
    /// `barrier`) made durable before anything points at it.
    func writeNew(_ bytes: [UInt8], at offset: UInt64, durable: Bool = true) throws {
        try image.file.write(bytes, at: offset)
        if durable { try image.file.sync() }
    }

    /// Makes everything written so far durable.
    func barrier() throws { try image.file.sync() }

    /// Bitmap data lowered where it is (`lowerBitmapInPlace`): each cluster written
    /// belongs to one bitmap of this image alone, and every value a torn write can leave
    /// (old bits, lowered bits, or a mix) is a valid bitmap holding at most the old bits,
    /// so no ordering step is needed; nothing is allocated, published or freed. Then a
    /// barrier.
    /// `content(k)` is what goes to `offsets[k]` (made one cluster at a time: memory stays
    /// one cluster whatever the bitmap's size).
    func overwriteBitmapData(at offsets: [UInt64], content: (Int) -> [UInt8]) throws {
        for (k, off) in offsets.enumerated() { try image.file.write(content(k), at: off) }
        try image.file.sync()
    }

    /// Extends the file with zeros to `length` bytes (`check -r` giving a refcount block
    /// the table names past the end of the file a cluster of its own, as QEMU does);
    /// a longer file leaks at worst. Never shrinks.
    func extendFile(to length: UInt64) throws {
        guard length > (try image.file.size()) else { return }
        try image.file.truncate(to: length)
        try image.file.sync()
        image.fileSize = try image.file.size()
    }

    // MARK: 3. Publication

    /// Header field `field` as `h` holds it (a table moved, the size changed).
    func publishHeader(_ field: HeaderField, of h: Header) throws {
        try Self.publishHeader(field, of: h, in: image)
    }

    /// Header field `field` as `h` holds it: one write, then a barrier. Needs no
    /// allocation, so it also serves a change that allocates nothing (feature bits, the
    /// size) and an image whose writing has just ended (marked corrupt).
    static func publishHeader(_ field: HeaderField, of h: Header, in image: QCow2Image) throws {
        try image.file.publish(field, of: h)
    }

    /// Cluster 0 rewritten (header, extensions, end marker, backing file name right after
    /// it, as QEMU lays it out) with one write, then a barrier; memory follows. Nothing
    /// is written when it does not fit in one cluster.
    func rewriteHeaderCluster(_ h: Header, extensions exts: [HeaderExtension], backingName: String?) throws {
        let headers = image.headers
        let (bytes, h) = try headers.layout(h, extensions: exts, backingName: backingName)
        try image.file.write(bytes, at: 0)
        try image.file.sync()
        headers.header = h
        headers.extensions = exts
        headers.backingFileName = backingName
    }

    /// Points L1 entry `i` at `value` (one 8-byte write, then a barrier): the one writer
    /// of a single L1 entry.
    static func setL1Entry(_ i: Int, _ value: UInt64, in image: QCow2Image) throws {
        var w = ByteWriter()
        w.u64(value)
        try image.file.write(w.bytes, at: image.header.l1TableOffset + UInt64(i) * 8)
        try image.file.sync()
        image.map.l1Table[i] = value  // in place: no copy of the table per entry
    }

    /// Empties L1 entries `range` (one write, then a barrier): the L2 tables they
    /// named are then unreferenced.
    func clearL1(_ range: Range<Int>) throws {
        guard !range.isEmpty else { return }
        try image.file.write([UInt8](repeating: 0, count: range.count * 8), at: image.header.l1TableOffset + UInt64(range.lowerBound) * 8)
        try image.file.sync()
        for j in range { image.map.l1Table[j] = 0 }
    }

    /// A pointer in the header (or an extension's payload) switched to what step 2
    /// wrote: one write, then a barrier.
    func publishHeader(_ bytes: [UInt8], at offset: UInt64) throws {
        try image.file.write(bytes, at: offset)
        try image.file.sync()
    }

    /// Rewrites entries `changed` of the active L1 table in place as `table` holds them
    /// (flag changes: a torn write leaves some entries old, some new, each valid), then a
    /// barrier.
    func updateL1(_ table: [UInt64], changed: Range<Int>) throws {
        guard !changed.isEmpty else { return }
        var w = ByteWriter()
        for e in table[changed] { w.u64(e) }
        try image.file.write(w.bytes, at: image.header.l1TableOffset + UInt64(changed.lowerBound) * 8)
        try image.file.sync()
        image.map.l1Table.replaceSubrange(changed, with: table[changed])
    }

    /// Switches the image to the L1 table step 2 wrote at `offset` (`entries`) and to disk
    /// size `size`, with one header write; the old L1 table's clusters are queued for
    /// step 4 (the L2 tables it named are the caller's to release).
    mutating func publishActiveL1(_ entries: [UInt64], at offset: UInt64, size: UInt64) throws {
        let g = image.geometry
        let old = image.header
        var h = old
        h.l1TableOffset = offset
        h.l1Size = UInt32(entries.count)
        h.size = size
        try publishHeader(.sizeAndL1Table, of: h)
        image.header = h
        image.l1Table = entries
        let oldStart = old.l1TableOffset >> UInt64(g.clusterBits)
        free((0..<g.clusters(forBytes: UInt64(old.l1Size) * 8)).map { oldStart + $0 })
    }

    /// L1 entry `i` of the active table set to `value` (a COPIED flag corrected): one
    /// write, then a barrier.
    func publishL1Entry(_ i: Int, _ value: UInt64) throws { try image.setL1Entry(i, value) }

    /// Switches the image to a refcount structure written by step 2 (`writeNew` of its
    /// blocks and table, then a `barrier`): one header write of the table's offset and
    /// size, then a barrier; the writable refcounts are reloaded from the new table. The
    /// old table and blocks are then unreferenced and, as QEMU leaves them, counted by
    /// the new structure: a check afterwards releases them as leaks.
    mutating func publishRefcountStructure(tableOffset: UInt64, tableClusters: UInt32) throws {
        var h = image.header
        h.refcountTableOffset = tableOffset
        h.refcountTableClusters = tableClusters
        try image.file.publish(.refcountTable, of: h)
        image.header.refcountTableOffset = tableOffset
        image.header.refcountTableClusters = tableClusters
        image.fileSize = try image.file.size()
        alloc = try Allocator(image: image, lenient: true)
        image.allocator = alloc
    }

    /// A refcount structure of another width (`r`, laid out with the new refcount order,
    /// its own clusters counted, the old structure's not) written durable, then
    /// refcount_order, refcount_table_offset and refcount_table_clusters switched with one
    /// header write and a barrier. The old structure's clusters are free from then on.
    /// The image's geometry no longer matches the file: its writing ends here (the caller
    /// opens the image again).
    func publishRefcountWidth(_ r: RefcountRebuild) throws {
        try writeRefcountStructure(r)
        var h = image.header
        h.refcountTableOffset = r.tableOffset
        h.refcountTableClusters = UInt32(r.tableClusters)
        h.refcountOrder = UInt32(r.g.refcountOrder)
        try image.file.publish(.refcountStructure, of: h)
        image.allocator = nil
    }

    /// How an L2 table reaches the disk.
    enum L2Target {
        /// A new table at `offset` (allocated in this transaction), replacing the shared
        /// table `replaces` (copy-on-write) or none: written whole, then the L1 entry.
        case new(offset: UInt64, replaces: UInt64?)
        /// Entries `changed` of the table at `offset`, written in place.
        case existing(offset: UInt64, changed: Range<Int>)
    }

    /// Publishes `table` for L1 entry `l1Index`. `afterData`: data was written in step 2,
    /// so a barrier makes it durable before an existing table points at it (a new table
    /// gets its barrier from being written first).
    mutating func publishL2(_ table: [UInt8], l1Index: Int, to target: L2Target, afterData: Bool) throws {
        let g = image.geometry
        switch target {
        case .new(let offset, let replaces):
            try image.file.write(table, at: offset)
            try image.file.sync()
            try Self.setL1Entry(l1Index, offset | L1Entry.copied, in: image)
            image.l2Cache.invalidate(offset)
            if let r = replaces {
                frees.append(r >> UInt64(g.clusterBits))
                image.l2Cache.invalidate(r)
            }
        case .existing(let offset, let changed):
            if afterData { try image.file.sync() }
            let lo = changed.lowerBound * g.l2EntrySize, hi = changed.upperBound * g.l2EntrySize
            try table.withUnsafeBytes { try image.file.write(UnsafeRawBufferPointer(rebasing: $0[lo..<hi]), at: offset + UInt64(lo)) }
            try image.file.sync()
            image.l2Cache.update(offset, table)
        }
    }

    // MARK: 4. Frees

    /// Clusters to release once the change is published.
    mutating func free(_ clusters: [UInt64]) { frees += clusters }

    /// Step 4 for part of a large change, applied now: the references of one L2 table and
    /// its data clusters, released once what stopped naming them is durable (keeps a
    /// change over a whole tree of tables in bounded memory).
    func releaseNow(_ clusters: [UInt64]) throws {
        for c in clusters { alloc.queueFree(c) }
        try alloc.commitFrees()
    }

    /// Ends the change: the image's size is refreshed first (the file grew: later
    /// requests must see their clusters inside it even if a free fails), then the frees.
    func finish() throws {
        image.fileSize = try image.file.size()
        for c in frees { alloc.queueFree(c) }
        try alloc.commitFrees()
    }
}

// MARK: - Step 1 as the allocator carries it out

extension MetadataTransaction {
    /// `Allocator.commit`: the refcount blocks it changed (`writeBlocks`, the allocator's
    /// own writes), a barrier, then the refcount table entries that point at new blocks,
    /// and a barrier.
    static func commitRefcountBlocks(in image: QCow2Image, writeBlocks: () throws -> Void,
                                     newTableEntries: [(index: Int, offset: UInt64)]) throws {
        try writeBlocks()
        try image.file.sync()
        guard !newTableEntries.isEmpty else { return }
        for (ti, off) in newTableEntries {
            var w = ByteWriter()
            w.u64(off)
            try image.file.write(w.bytes, at: image.header.refcountTableOffset + UInt64(ti) * 8)
        }
        try image.file.sync()
    }

    /// The refcount table moved to a larger one (the allocator growing it): the blocks, a
    /// barrier, the new table whole (`tableWritten` then runs), a barrier, one header
    /// write switching offset and size together with its barrier; memory follows. The old
    /// table is the allocator's to free.
    static func moveRefcountTable(in image: QCow2Image, writeBlocks: () throws -> Void, table: [UInt64],
                                  to offset: UInt64, clusters: UInt32, tableWritten: () -> Void) throws {
        try writeBlocks()
        try image.file.sync()
        var bytes = ByteWriter()
        for e in table { bytes.u64(e) }
        try image.file.write(bytes.bytes, at: offset)
        try image.file.sync()
        tableWritten()
        var h = image.header
        h.refcountTableOffset = offset
        h.refcountTableClusters = clusters
        try publishHeader(.refcountTable, of: h, in: image)
        image.header.refcountTableOffset = offset
        image.header.refcountTableClusters = clusters
    }
}

extension Collection where Element == (Int, L2Entry) {
    /// The range of table indices a list of entry updates touches.
    var touchedRange: Range<Int> {
        let indices = map(\.0)
        return (indices.min() ?? 0)..<((indices.max() ?? -1) + 1)
    }
}
