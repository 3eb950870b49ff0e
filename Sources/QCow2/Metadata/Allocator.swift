/// Writable refcounts: the cluster allocator.
///
/// Increments are buffered in dirty refcount blocks and made durable by
/// `commit()`: first the blocks, a sync, then the refcount table entries that
/// point at new blocks, and a sync — so a crash leaves at worst leaked clusters.
/// Decrements are queued with `queueFree` and applied only by `commitFrees()`,
/// which callers run after the metadata that stopped referencing the clusters
/// is durable.
final class Allocator {
    unowned let image: QCow2Image
    let g: Geometry
    /// The refcount table (authoritative in memory; at most 8 MiB).
    private(set) var table: [UInt64]
    private var blocks: [UInt64: [UInt8]] = [:]
    /// Dirty refcount blocks and the byte range of each that changed.
    private var dirty: [UInt64: Range<Int>] = [:]
    private var pendingTableEntries: [Int: UInt64] = [:]
    private var pendingFrees: [UInt64] = []
    private var reserved: [Range<UInt64>] = []
    /// First cluster index worth looking at for free space.
    private var freeHint: UInt64 = 0
    let maxRefcount: UInt64
    private let blockCap: Int

    static let offsetMask: UInt64 = 0xFFFF_FFFF_FFFF_FE00

    /// `lenient` (only for check -r, which may rebuild the structure): refcount table
    /// entries that point outside the file are treated as missing blocks instead of
    /// refusing to write.
    init(image: QCow2Image, cacheBytes: Int = 4 * 1024 * 1024, lenient: Bool = false) throws {
        self.image = image
        self.g = image.geometry
        let h = image.header
        let raw = try image.file.read(count: Int(h.refcountTableClusters) << g.clusterBits, at: h.refcountTableOffset)
        var t: [UInt64] = []
        raw.withUnsafeBytes { decodeBigEndianU64($0, into: &t) }
        for (i, e) in t.enumerated() {
            let off = e & Self.offsetMask
            guard g.isAligned(off), off < image.fileSize || off == 0 else {
                if lenient { t[i] = 0; continue }
                throw QCow2Error.needsRepair(path: image.path, detail: "invalid refcount table entry \(i): refcount block offset 0x\(hex(off)) is invalid or beyond the end of the file")
            }
            t[i] = off
        }
        table = t
        maxRefcount = g.refcountBits == 64 ? .max : (UInt64(1) << UInt64(g.refcountBits)) - 1
        blockCap = max(8, cacheBytes / g.clusterSize)
    }

    private var entriesPerBlock: UInt64 { UInt64(1) << UInt64(g.refblockBits) }

    // MARK: Refcount blocks

    private func blockOffset(forCluster c: UInt64) -> UInt64? {
        let ti = c >> UInt64(g.refblockBits)
        guard ti < UInt64(table.count) else { return nil }
        let off = table[Int(ti)]
        return off == 0 ? nil : off
    }

    private func loadBlock(_ off: UInt64) throws -> [UInt8] {
        if let b = blocks[off] { return b }
        if blocks.count >= blockCap { try evict() }
        let b = try image.file.read(count: g.clusterSize, at: off)
        blocks[off] = b
        return b
    }

    private func evict() throws {
        // Clean blocks first; dirty ones are written (an early increment leaks at worst).
        if let clean = blocks.keys.first(where: { dirty[$0] == nil }) {
            blocks[clean] = nil
            return
        }
        try writeDirtyBlocks()
        blocks.removeAll(keepingCapacity: true)
    }

    /// Refcount of host cluster `c` as this session sees it.
    func refcount(_ c: UInt64) throws -> UInt64 {
        guard let off = blockOffset(forCluster: c) else { return 0 }
        let b = try loadBlock(off)
        return RefcountReader.entry(b, Int(c & (entriesPerBlock - 1)), order: g.refcountOrder)
    }

    private func set(_ c: UInt64, _ v: UInt64) throws {
        guard let off = blockOffset(forCluster: c) else {
            throw QCow2Error.malformed(path: image.path, field: "refcount", detail: "no refcount block for cluster \(c)")
        }
        guard v <= maxRefcount else {
            throw QCow2Error.unsupported(path: image.path,
                                         detail: "refcount of cluster \(c) would exceed the maximum (\(maxRefcount)) of \(g.refcountBits)-bit refcounts")
        }
        if blocks[off] == nil { _ = try loadBlock(off) }
        let i = Int(c & (entriesPerBlock - 1))
        // In place: a copy of the 64 KiB block per update would dominate bulk allocation.
        Self.store(&blocks[off]!, i, v, order: g.refcountOrder)
        let bytes = Self.byteRange(i, order: g.refcountOrder)
        if let r = dirty[off] {
            dirty[off] = min(r.lowerBound, bytes.lowerBound)..<max(r.upperBound, bytes.upperBound)
        } else {
            dirty[off] = bytes
        }
    }

    /// The bytes of a refcount block that hold entry `i`.
    static func byteRange(_ i: Int, order: Int) -> Range<Int> {
        if order < 3 {
            let byte = (i << order) >> 3
            return byte..<(byte + 1)
        }
        let width = 1 << (order - 3)
        return (i * width)..<((i + 1) * width)
    }

    static func store(_ block: inout [UInt8], _ i: Int, _ v: UInt64, order: Int) {
        switch order {
        case 0, 1, 2:
            let bits = 1 << order
            let bitIndex = i * bits
            let mask = UInt8((1 << bits) - 1) << UInt8(bitIndex & 7)
            block[bitIndex >> 3] = (block[bitIndex >> 3] & ~mask) | (UInt8(v) << UInt8(bitIndex & 7)) & mask
        case 3: block[i] = UInt8(v)
        case 4: block[2 * i] = UInt8(v >> 8); block[2 * i + 1] = UInt8(v & 0xFF)
        case 5: for k in 0..<4 { block[4 * i + k] = UInt8((v >> UInt64(24 - 8 * k)) & 0xFF) }
        default: for k in 0..<8 { block[8 * i + k] = UInt8((v >> UInt64(56 - 8 * k)) & 0xFF) }
        }
    }

    /// Makes sure a refcount block covers cluster range `ti`, growing the table when
    /// needed. The block goes inside the range it covers (self-describing) when a
    /// cluster there is not reserved by the allocation in progress, else in the first
    /// free cluster after the range.
    private func ensureBlock(_ ti: UInt64) throws {
        if ti >= UInt64(table.count) { try growTable(toInclude: ti) }
        if table[Int(ti)] != 0 { return }
        let first = ti << UInt64(g.refblockBits)
        var b = first
        while b < first + entriesPerBlock && isReserved(b) { b += 1 }
        if b < first + entriesPerBlock {
            try placeBlock(ti, at: b)
            try set(b, 1)
            return
        }
        // The whole range is reserved: put the block after it.
        while true {
            let c = try findFreeRun(1, from: first + entriesPerBlock)
            let tc = c >> UInt64(g.refblockBits)
            if tc >= UInt64(table.count) || table[Int(tc)] == 0 {
                try ensureBlock(tc)
                if try refcount(c) != 0 { continue }
            }
            try placeBlock(ti, at: c)
            try set(c, 1)
            return
        }
    }

    private func placeBlock(_ ti: UInt64, at b: UInt64) throws {
        guard b < Geometry.maxHostOffset >> UInt64(g.clusterBits) else {
            throw QCow2Error.unsupported(path: image.path, detail: "cannot place a refcount block")
        }
        let off = b << UInt64(g.clusterBits)
        if blocks.count >= blockCap { try evict() }
        blocks[off] = [UInt8](repeating: 0, count: g.clusterSize)
        dirty[off] = 0..<g.clusterSize  // a new block is written whole
        table[Int(ti)] = off
        pendingTableEntries[Int(ti)] = off
    }

    private func isReserved(_ c: UInt64) -> Bool { reserved.contains { $0.contains(c) } }

    /// Moves the refcount table to a larger one. Done at once, in crash-safe order:
    /// new blocks, new table, header switch, then the old table is freed.
    private func growTable(toInclude ti: UInt64) throws {
        let cs = UInt64(g.clusterSize)
        let perCluster = cs / 8
        var clusters = (ti + 1 + perCluster - 1) / perCluster
        clusters = max(clusters, UInt64(image.header.refcountTableClusters) * 3 / 2 + 1)
        guard clusters * cs <= UInt64(Geometry.maxRefcountTableBytes) else {
            throw QCow2Error.unsupported(path: image.path, detail: "the refcount table would exceed 8 MiB")
        }
        let oldOffset = image.header.refcountTableOffset
        let oldClusters = UInt64(image.header.refcountTableClusters)
        // Place the new table in free space beyond everything in use.
        let start = try findFreeRun(clusters, from: endOfUse())
        let newRange = start..<(start + clusters)
        reserved.append(newRange)
        defer { reserved.removeAll { $0 == newRange } }
        table += [UInt64](repeating: 0, count: Int(clusters * perCluster) - table.count)
        for c in start..<(start + clusters) {
            try ensureBlock(c >> UInt64(g.refblockBits))
            try set(c, try refcount(c) + 1)
        }
        // Blocks durable, then the table, then the header.
        try MetadataTransaction.moveRefcountTable(in: image, writeBlocks: writeDirtyBlocks, table: table, to: start * cs,
                                                  clusters: UInt32(clusters), tableWritten: { pendingTableEntries.removeAll() })
        // The old table is garbage now.
        for c in 0..<oldClusters { queueFree((oldOffset / cs) + c) }
    }

    /// The first cluster past the end of the file.
    private func endOfUse() throws -> UInt64 {
        g.clusters(forBytes: try image.file.size())
    }

    // MARK: Allocation

    /// First run of `n` free (refcount 0, not reserved) clusters at or after `from`.
    func findFreeRun(_ n: UInt64, from: UInt64) throws -> UInt64 {
        var start = max(from, 1)
        var len: UInt64 = 0
        var c = start
        while len < n {
            let ti = c >> UInt64(g.refblockBits)
            if (ti >= UInt64(table.count) || table[Int(ti)] == 0) && !reserved.contains(where: { $0.overlaps(c..<((ti + 1) << UInt64(g.refblockBits))) }) {
                // A whole range without a block: all free.
                let rangeEnd = (ti + 1) << UInt64(g.refblockBits)
                len += rangeEnd - c
                c = rangeEnd
                continue
            }
            if try refcount(c) == 0 && !isReserved(c) {
                len += 1
            } else {
                len = 0
                start = c + 1
            }
            c += 1
        }
        return start
    }

    /// Allocates `n` contiguous clusters (refcount 1, not yet durable: call `commit`).
    /// Returns the host offset of the first.
    func allocate(_ n: Int) throws -> UInt64 {
        precondition(n > 0)
        let count = UInt64(n)
        let start = try findFreeRun(count, from: freeHint)
        guard start + count <= Geometry.maxHostOffset >> UInt64(g.clusterBits) else {
            throw QCow2Error.unsupported(path: image.path, detail: "the image file would exceed the maximum host offset")
        }
        let run = start..<(start + count)
        reserved.append(run)
        defer { reserved.removeAll { $0 == run } }
        for ti in (start >> UInt64(g.refblockBits))...((start + count - 1) >> UInt64(g.refblockBits)) {
            try ensureBlock(ti)
        }
        for c in run { try set(c, 1) }
        freeHint = start + count
        return start << UInt64(g.clusterBits)
    }

    /// Allocates cluster `c` itself when it is free (refcount 1, not yet durable); returns
    /// false, changing nothing, when it is in use, reserved or out of range.
    func allocateIfFree(_ c: UInt64) throws -> Bool {
        guard c > 0, c < Geometry.maxHostOffset >> UInt64(g.clusterBits), !isReserved(c) else { return false }
        let ti = c >> UInt64(g.refblockBits)
        if ti < UInt64(table.count), table[Int(ti)] != 0, try refcount(c) != 0 { return false }
        let run = c..<(c + 1)
        reserved.append(run)
        defer { reserved.removeAll { $0 == run } }
        try ensureBlock(ti)
        guard try refcount(c) == 0 else { return false }
        try set(c, 1)
        if freeHint == c { freeHint = c + 1 }
        return true
    }

    /// Adds a reference to an allocated cluster (sharing, e.g. a copied L2 table).
    func increment(_ c: UInt64) throws {
        let v = try refcount(c)
        guard v > 0 else {
            throw QCow2Error.malformed(path: image.path, field: "refcount", detail: "cluster \(c) is referenced but has refcount 0")
        }
        try set(c, v + 1)
    }

    /// Sets the refcount of an allocated cluster outright (check -r); its block must exist.
    func forceRefcount(_ c: UInt64, _ v: UInt64) throws {
        try set(c, v)
        if v == 0 { freeHint = min(freeHint, c) }
    }

    /// Queues a decrement, applied by `commitFrees`.
    func queueFree(_ c: UInt64) { pendingFrees.append(c) }

    // MARK: Durability

    private func writeDirtyBlocks() throws {
        for (off, r) in dirty.sorted(by: { $0.key < $1.key }) {
            guard let b = blocks[off] else { continue }
            // Only the changed bytes, rounded to 512 (a block written whole when new).
            let lo = r.lowerBound & ~511, hi = min(b.count, (r.upperBound + 511) & ~511)
            try b.withUnsafeBytes { try image.file.write(UnsafeRawBufferPointer(rebasing: $0[lo..<hi]), at: off + UInt64(lo)) }
        }
        dirty.removeAll()
    }

    /// Makes all increments durable: blocks, sync, new table entries, sync (in the order
    /// `MetadataTransaction` keeps).
    func commit() throws {
        guard !dirty.isEmpty || !pendingTableEntries.isEmpty else { return }
        let entries = pendingTableEntries.sorted(by: { $0.key < $1.key }).map { (index: $0.key, offset: $0.value) }
        try MetadataTransaction.commitRefcountBlocks(in: image, writeBlocks: writeDirtyBlocks, newTableEntries: entries)
        pendingTableEntries.removeAll()
    }

    /// Applies the queued decrements (the referencing metadata must already be durable).
    func commitFrees() throws {
        guard !pendingFrees.isEmpty else { return }
        let frees = pendingFrees
        pendingFrees.removeAll()
        for c in frees {
            let v = try refcount(c)
            guard v > 0 else { continue }
            try set(c, v - 1)
            if v == 1 {
                freeHint = min(freeHint, c)
                image.l2Cache.invalidate(c << UInt64(g.clusterBits))
                if image.compressedPacking?.host == c << UInt64(g.clusterBits) { image.compressedPacking = nil }
            }
        }
        try commit()
    }
}

