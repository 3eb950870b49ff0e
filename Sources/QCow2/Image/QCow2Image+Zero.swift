/// Zero writes and discards. Whole clusters (whole subclusters with extended L2)
/// change only metadata: the entry is switched to "reads as zero" (v3 zero flag or
/// zero subcluster bits) and durable before any cluster it stops using is freed.
/// Partial clusters are written as data (zero writes) or left alone (discards, which
/// are advisory, as in QEMU).
extension QCow2Image {
    /// Makes [offset, offset+length) read as zeros. With `unmap`, host clusters may be released.
    public func writeZeroes(at offset: UInt64, length: UInt64, unmap: Bool = false) throws {
        try guardingMetadata { try zeroOrDiscard(offset, length, unmap: unmap, discard: false) }
    }

    /// Releases whole clusters in [offset, offset+length); they then read as zeros
    /// (v3, or an image without backing file). Partial clusters are left unchanged.
    public func discard(at offset: UInt64, length: UInt64) throws {
        try guardingMetadata { try zeroOrDiscard(offset, length, unmap: true, discard: true) }
    }

    /// Makes everything written so far durable.
    public func flush() throws {
        try allocator?.commit()
        try file.sync()
    }

    private func zeroOrDiscard(_ offset: UInt64, _ length: UInt64, unmap: Bool, discard: Bool) throws {
        guard length > 0 else { return }
        guard length <= UInt64(Int.max) else { throw QCow2Error.invalidArgument(path: path, detail: "request too large") }
        try checkRange(offset, Int(length))
        _ = try requireAllocator()
        try prepareForWrite()
        trackWrite(offset, length)
        var pos = offset
        let end = offset + length
        while pos < end {
            let l2End = (pos | (geometry.bytesPerL2 - 1)) &+ 1
            let n = min(end, l2End) - pos
            try zeroWithinL2(pos, n, unmap: unmap, discard: discard)
            pos += n
        }
        decompressed.invalidate()
    }

    /// Whether guest bytes [offset, offset+length) already read as zeros.
    private func readsAsZero(_ offset: UInt64, _ length: UInt64) throws -> Bool {
        let bytes = try read(count: Int(length), at: offset)
        return !bytes.contains { $0 != 0 }
    }

    /// Zeroes a partial region by writing zeros (unless it already reads as zeros).
    private func zeroPartial(_ offset: UInt64, _ length: UInt64, discard: Bool) throws {
        guard length > 0, !discard, !(try readsAsZero(offset, length)) else { return }
        try write([UInt8](repeating: 0, count: Int(length)), at: offset)
    }

    /// What a zero write or discard changes in one L2 table: entries, clusters to free,
    /// and parts of compressed clusters that must be written as zero data.
    private struct ZeroChange {
        var updates: [(Int, L2Entry)] = []
        var frees: [UInt64] = []
        var materialize: [(UInt64, UInt64)] = []
    }

    private func zeroWithinL2(_ off: UInt64, _ len: UInt64, unmap: Bool, discard: Bool) throws {
        let g = geometry
        let alloc = try requireAllocator()
        let end = off + len
        // The granule metadata can express: zero writes go down to subclusters;
        // discards, like QEMU's, work on whole clusters only.
        let unit = UInt64(1) << UInt64(discard ? g.clusterBits : g.subclusterBits)
        let fullStart = (off + unit - 1) & ~(unit - 1)
        // The end of the disk counts as aligned (nothing past it is read), as in QEMU.
        let fullEnd = end == virtualSize ? (end + unit - 1) & ~(unit - 1) : end & ~(unit - 1)
        if fullStart >= fullEnd {
            try zeroPartial(off, len, discard: discard)
            return
        }
        try zeroPartial(off, fullStart - off, discard: discard)
        try zeroPartial(fullEnd, end - fullEnd, discard: discard)

        let hasBacking = backingFileName != nil
        if header.version < 3 && hasBacking {
            // No zero flag: clusters read as zeros only when unallocated without a backing file.
            if !discard { try writeZeroData(fullStart, fullEnd) }
            return
        }
        let l1i = g.l1Index(off)
        if L1Entry(l1Table[l1i]).l2Offset == 0 && !hasBacking && (header.version < 3 || discard || unmap) {
            return  // nothing allocated, nothing behind: already zeros
        }
        var (table, tableOffset, replaces) = try map.l2TableForWrite(l1i, refcounts: alloc)
        let rangeBase = off & ~(g.bytesPerL2 - 1)
        var change = ZeroChange()
        for i in g.l2Index(fullStart)...g.l2Index(fullEnd - 1) {
            let cg = rangeBase + UInt64(i) * UInt64(g.clusterSize)
            let e = map.l2Entry(table, i)
            try map.validateForWrite(e, index: i, table: tableOffset ?? 0, refcounts: alloc)
            if g.extendedL2 {
                zeroSubclusters(e, i, max(fullStart, cg) - cg, min(fullEnd, cg + UInt64(g.clusterSize)) - cg,
                                guest: cg, unmap: unmap || discard, into: &change)
            } else {
                zeroCluster(e, i, unmap: unmap || discard, into: &change)
            }
        }
        if !change.updates.isEmpty || tableOffset == nil {
            for (i, e) in change.updates { map.setL2Entry(&table, i, e) }
            var tx = try MetadataTransaction(self)
            if let t = tableOffset {
                try tx.commitRefcounts()
                try tx.publishL2(table, l1Index: l1i, to: .existing(offset: t, changed: change.updates.touchedRange), afterData: false)
            } else {
                let newOffset = try tx.allocate(1)
                try tx.commitRefcounts()
                try tx.publishL2(table, l1Index: l1i, to: .new(offset: newOffset, replaces: replaces), afterData: false)
            }
            tx.free(change.frees)
            try tx.finish()
        }
        for (a, n) in change.materialize where !discard { try write([UInt8](repeating: 0, count: Int(n)), at: a) }
        fileSize = try file.size()
    }

    /// Guest range [a, b) written as zero data, 1 MiB at a time.
    private func writeZeroData(_ a: UInt64, _ b: UInt64) throws {
        var pos = a
        while pos < b {
            let n = min(b - pos, 1 << 20)
            try write([UInt8](repeating: 0, count: Int(n)), at: pos)
            pos += n
        }
    }

    /// Extended L2: the subclusters covering [a, b) of the cluster at `guest` (offsets
    /// within it) become zero; a cluster left with no allocated subcluster is released when
    /// unmapping (or when the image does not own it). A compressed cluster is replaced by
    /// an all-zero entry when wholly covered, else its part is written as zero data.
    private func zeroSubclusters(_ e: L2Entry, _ i: Int, _ a: UInt64, _ b: UInt64, guest: UInt64, unmap: Bool,
                                 into change: inout ZeroChange) {
        let sb = UInt64(geometry.subclusterBits)
        let mask = Geometry.subclusterMask(from: Int(a >> sb), through: Int((b - 1) >> sb))
        if e.isCompressed {
            if mask == .max {
                change.updates.append((i, L2Entry(0, bitmap: UInt64(UInt32.max) << 32)))
                change.frees += map.referencedClusters(e)
            } else {
                change.materialize.append((guest + a, b - a))
            }
            return
        }
        let oldAlloc = UInt32(truncatingIfNeeded: e.bitmap), oldZero = UInt32(truncatingIfNeeded: e.bitmap >> 32)
        let newAlloc = oldAlloc & ~mask, newZero = oldZero | mask
        var raw = e.raw
        if e.hostOffset != 0 && newAlloc == 0 && (unmap || !e.isCopied) {
            change.frees += map.referencedClusters(e)
            raw = 0
        }
        let n = L2Entry(raw, bitmap: UInt64(newZero) << 32 | UInt64(newAlloc))
        if n != e { change.updates.append((i, n)) }
    }

    /// Standard L2, whole clusters only: v2 (without backing file) makes the cluster
    /// unallocated; v3 sets the zero flag, keeping an owned cluster's allocation unless
    /// unmapping.
    private func zeroCluster(_ e: L2Entry, _ i: Int, unmap: Bool, into change: inout ZeroChange) {
        if header.version < 3 {
            if e.raw != 0 {
                change.updates.append((i, L2Entry(0)))
                change.frees += map.referencedClusters(e)
            }
            return
        }
        let owned = !e.isCompressed && e.hostOffset != 0 && e.isCopied
        if !unmap && owned {
            let n = L2Entry(e.raw | L2Entry.zeroFlag)
            if n != e { change.updates.append((i, n)) }
        } else if e.raw != L2Entry.zeroFlag {
            change.updates.append((i, L2Entry(L2Entry.zeroFlag)))
            change.frees += map.referencedClusters(e)
        }
    }
}
