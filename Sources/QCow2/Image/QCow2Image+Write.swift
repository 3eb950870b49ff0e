/// The write path: guest data.
///
/// Every request is split at L2-table boundaries and each piece is one
/// `MetadataTransaction` (refcounts, data, L2/L1 publication, frees; each step durable
/// before the next, so a crash leaves at worst leaked clusters, and every guest byte
/// reads either its old or its new value). New clusters are filled completely
/// (copy-on-write of the old guest content for partial clusters); in-place writes go to
/// clusters this image owns alone (COPIED). `L2RangeWrite` plans and writes one piece.
extension QCow2Image {
    /// Writes `data` at guest `offset`.
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try guardingMetadata { try writeUnguarded(data, at: offset) }
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }

    func writeUnguarded(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, data.count)
        _ = try requireAllocator()
        try prepareForWrite()
        trackWrite(offset, UInt64(data.count))
        var done = 0
        while done < data.count {
            let off = offset + UInt64(done)
            let l2End = (off | (geometry.bytesPerL2 - 1)) &+ 1
            let n = Int(min(UInt64(data.count - done), l2End - off))
            try writeWithinL2(UnsafeRawBufferPointer(rebasing: data[done..<(done + n)]), at: off)
            done += n
        }
        decompressed.invalidate()
    }

    /// The current guest content of the cluster at `guest` (zero-filled past the disk end).
    func clusterContent(_ guest: UInt64) throws -> [UInt8] {
        let cs = geometry.clusterSize
        var buf = [UInt8](repeating: 0, count: cs)
        let n = Int(min(UInt64(cs), virtualSize - guest))
        try buf.withUnsafeMutableBytes { try read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: guest) }
        return buf
    }

    /// One piece of a write (inside one L2 table's range) as one transaction.
    private func writeWithinL2(_ data: UnsafeRawBufferPointer, at off: UInt64) throws {
        let alloc = try requireAllocator()
        var tx = try MetadataTransaction(self)
        let l1i = geometry.l1Index(off)
        guard l1i < l1Table.count else {
            throw QCow2Error.malformed(path: path, field: "l1_size", detail: "L1 table too small for offset \(off)")
        }
        var (table, tableOffset, replaces) = try map.l2TableForWrite(l1i, refcounts: alloc)
        var piece = L2RangeWrite(image: self, data: data, at: off)
        let plans = try piece.plan(table, tableOffset: tableOffset, refcounts: alloc)

        // 1. Refcounts: a new table if needed, then the new data clusters.
        let newTableOffset = tableOffset == nil ? try tx.allocate(1) : nil
        let freshCount = plans.filter(\.isFresh).count
        piece.nextFresh = freshCount > 0 ? try tx.allocate(freshCount) : 0
        try tx.commitRefcounts()

        // 2. Data.
        for p in plans { try piece.write(p) }
        try piece.flushRun()

        // 3. Publication, 4. frees.
        for (i, e) in piece.updates { map.setL2Entry(&table, i, e) }
        if let newOffset = newTableOffset {
            try tx.publishL2(table, l1Index: l1i, to: .new(offset: newOffset, replaces: replaces), afterData: true)
        } else if let t = tableOffset, !piece.updates.isEmpty {
            try tx.publishL2(table, l1Index: l1i, to: .existing(offset: t, changed: piece.updates.touchedRange), afterData: true)
        }
        tx.free(piece.frees)
        try tx.finish()
    }
}

/// Step 2 of one write piece: what each cluster needs (`plan`), then its data (`write`),
/// collecting the L2 entries to publish and the clusters to free. Pieces of the caller's
/// buffer going to consecutive host offsets are written with one pwrite.
private struct L2RangeWrite {
    enum Plan {
        /// Write the covered bytes in place (this image owns the cluster alone).
        case inPlace(host: UInt64)
        /// Fill the owned host cluster, then update the entry (zero-allocated, or extended L2 subclusters).
        case fill(host: UInt64)
        /// Allocate a new cluster, fill it, point the entry at it, free what it replaces.
        case fresh
    }

    struct ClusterPlan {
        let index: Int
        let plan: Plan
        let old: L2Entry
        var isFresh: Bool { if case .fresh = plan { return true } else { return false } }
    }

    let image: QCow2Image
    let g: Geometry
    let data: UnsafeRawBufferPointer
    let off: UInt64
    let end: UInt64
    let rangeBase: UInt64
    /// The next of the new data clusters allocated in step 1.
    var nextFresh: UInt64 = 0
    private(set) var updates: [(Int, L2Entry)] = []
    private(set) var frees: [UInt64] = []
    private var runHost: UInt64 = 0, runStart = 0, runEnd = 0

    init(image: QCow2Image, data: UnsafeRawBufferPointer, at off: UInt64) {
        self.image = image
        self.g = image.geometry
        self.data = data
        self.off = off
        self.end = off + UInt64(data.count)
        self.rangeBase = off & ~(image.geometry.bytesPerL2 - 1)
    }

    /// What each cluster the piece touches needs, after the entry was checked.
    func plan(_ table: [UInt8], tableOffset: UInt64?, refcounts: Allocator) throws -> [ClusterPlan] {
        var plans: [ClusterPlan] = []
        for i in g.l2Index(off)...g.l2Index(end - 1) {
            let e = image.map.l2Entry(table, i)
            try image.map.validateForWrite(e, index: i, table: tableOffset ?? 0, refcounts: refcounts)
            let plan: Plan
            if e.isCompressed || e.hostOffset == 0 {
                plan = .fresh
            } else if !e.isCopied {
                plan = .fresh  // shared with a snapshot (or COPIED wrongly clear): copy on write
            } else if g.extendedL2 || e.raw & L2Entry.zeroFlag != 0 {
                plan = .fill(host: e.hostOffset)
            } else {
                plan = .inPlace(host: e.hostOffset)
            }
            plans.append(ClusterPlan(index: i, plan: plan, old: e))
        }
        return plans
    }

    /// The part of one cluster the piece covers: guest range [s, e) of cluster `cg`.
    private struct Part {
        let cg: UInt64, s: UInt64, e: UInt64
        let src: UnsafeRawBufferPointer
        /// Subclusters the write touches (extended L2).
        let touched: UInt32
    }

    mutating func write(_ p: ClusterPlan) throws {
        let cs = UInt64(g.clusterSize)
        let cg = rangeBase + UInt64(p.index) * cs
        let s = max(off, cg), e = min(end, cg + cs)
        let scBits = UInt64(g.subclusterBits)
        let part = Part(cg: cg, s: s, e: e, src: UnsafeRawBufferPointer(rebasing: data[Int(s - off)..<Int(e - off)]),
                        touched: g.extendedL2 ? Geometry.subclusterMask(from: Int((s - cg) >> scBits), through: Int((e - 1 - cg) >> scBits)) : 0)
        switch p.plan {
        case .inPlace(let host):
            try writeDirect(host + (s - cg), Int(s - off), Int(e - off))
        case .fill(let host):
            try fill(host, p, part)
        case .fresh:
            let host = nextFresh
            nextFresh += cs
            try writeFresh(host, p, part)
            frees += image.map.referencedClusters(p.old)
        }
    }

    /// An owned cluster that does not hold all of its data yet: a zero cluster with its
    /// own host cluster (filled, then the zero flag dropped), or extended L2 subclusters
    /// (allocated ones in place; the others filled whole, then marked allocated).
    private mutating func fill(_ host: UInt64, _ p: ClusterPlan, _ part: Part) throws {
        if !g.extendedL2 {
            var buf = [UInt8](repeating: 0, count: g.clusterSize)
            Self.copy(part.src, into: &buf, at: part.s - part.cg)
            try image.file.write(buf, at: host)
            updates.append((p.index, L2Entry(host | L2Entry.copied)))
            return
        }
        let oldAlloc = UInt32(truncatingIfNeeded: p.old.bitmap)
        let oldZero = UInt32(truncatingIfNeeded: p.old.bitmap >> 32)
        let missing = part.touched & ~oldAlloc
        if missing != 0 {
            var buf = try image.clusterContent(part.cg)
            Self.copy(part.src, into: &buf, at: part.s - part.cg)
            try writeSubclusters(buf, mask: missing, host: host)
        }
        if part.touched & oldAlloc != 0 {
            try writeSubclusterPart(part.src, from: part.s - part.cg, mask: part.touched & oldAlloc, host: host)
        }
        let alloc = oldAlloc | part.touched, zero = oldZero & ~part.touched
        if alloc != oldAlloc || zero != oldZero {
            updates.append((p.index, L2Entry(host | L2Entry.copied, bitmap: UInt64(zero) << 32 | UInt64(alloc))))
        }
    }

    /// A new cluster: straight from the caller's buffer when the piece covers it whole,
    /// else the old guest content with the new bytes over it.
    private mutating func writeFresh(_ host: UInt64, _ p: ClusterPlan, _ part: Part) throws {
        let cs = UInt64(g.clusterSize)
        if part.s == part.cg && part.e == part.cg + cs {
            // With extended L2, every subcluster becomes allocated and none reads as zero.
            try writeDirect(host, Int(part.s - off), Int(part.e - off))
            updates.append((p.index, g.extendedL2 ? L2Entry(host | L2Entry.copied, bitmap: UInt64(UInt32.max))
                                                   : L2Entry(host | L2Entry.copied)))
            return
        }
        var content = try image.clusterContent(part.cg)
        Self.copy(part.src, into: &content, at: part.s - part.cg)
        if !g.extendedL2 {
            try image.file.write(content, at: host)
            updates.append((p.index, L2Entry(host | L2Entry.copied)))
            return
        }
        let oldAlloc = UInt32(truncatingIfNeeded: p.old.bitmap)
        let oldZero = UInt32(truncatingIfNeeded: p.old.bitmap >> 32)
        let alloc: UInt32 = p.old.isCompressed ? .max : oldAlloc | part.touched
        let zero: UInt32 = p.old.isCompressed ? 0 : oldZero & ~part.touched
        try writeSubclusters(content, mask: alloc, host: host)
        updates.append((p.index, L2Entry(host | L2Entry.copied, bitmap: UInt64(zero) << 32 | UInt64(alloc))))
    }

    private static func copy(_ src: UnsafeRawBufferPointer, into buf: inout [UInt8], at start: UInt64) {
        buf.withUnsafeMutableBytes { $0.baseAddress!.advanced(by: Int(start)).copyMemory(from: src.baseAddress!, byteCount: src.count) }
    }

    mutating func flushRun() throws {
        guard runEnd > runStart else { return }
        try image.file.write(UnsafeRawBufferPointer(rebasing: data[runStart..<runEnd]), at: runHost)
        runEnd = runStart
    }

    /// Bytes [a, b) of the caller's buffer go to `host`: joined to the pending run when
    /// they continue it.
    private mutating func writeDirect(_ host: UInt64, _ a: Int, _ b: Int) throws {
        if runEnd > runStart && runEnd == a && runHost + UInt64(runEnd - runStart) == host {
            runEnd = b
            return
        }
        try flushRun()
        runHost = host; runStart = a; runEnd = b
    }

    /// Writes the subclusters of `cluster` (a full cluster's content) selected by `mask`, in runs.
    private func writeSubclusters(_ cluster: [UInt8], mask: UInt32, host: UInt64) throws {
        let sc = 1 << g.subclusterBits
        var sub = 0
        while sub < 32 {
            if mask & (1 << UInt32(sub)) == 0 { sub += 1; continue }
            var endSub = sub
            while endSub < 32 && mask & (1 << UInt32(endSub)) != 0 { endSub += 1 }
            try cluster.withUnsafeBytes {
                try image.file.write(UnsafeRawBufferPointer(rebasing: $0[(sub * sc)..<(endSub * sc)]), at: host + UInt64(sub * sc))
            }
            sub = endSub
        }
    }

    /// Writes the part of `src` (which starts at `start` within the cluster) that falls in the subclusters of `mask`.
    private func writeSubclusterPart(_ src: UnsafeRawBufferPointer, from start: UInt64, mask: UInt32, host: UInt64) throws {
        let sc = UInt64(1) << UInt64(g.subclusterBits)
        let end = start + UInt64(src.count)
        for sub in 0..<32 where mask & (1 << UInt32(sub)) != 0 {
            let a = max(start, UInt64(sub) * sc), b = min(end, UInt64(sub + 1) * sc)
            guard a < b else { continue }
            try image.file.write(UnsafeRawBufferPointer(rebasing: src[Int(a - start)..<Int(b - start)]), at: host + a)
        }
    }
}
