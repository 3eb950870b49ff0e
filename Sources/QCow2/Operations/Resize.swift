/// Changes the virtual size of a qcow2 image.
///
/// Growing writes a larger L1 table when needed (new table durable, then one
/// 12-byte header write, then the old table freed). Shrinking releases every
/// cluster past the new end first. Persistent bitmaps follow the new size in a
/// sequence where every crash point leaves an image QEMU opens: the bitmaps are
/// first marked in use (so their size is not checked), the size changes, and
/// then tables of the new size replace the old ones.
extension QCow2Image {
    public func resize(to newSize: UInt64, allowShrink: Bool, preallocation: CreateOptions.Preallocation = .off) throws {
        _ = try requireAllocator()
        let g = geometry
        if let refusal = try resizeRefusal(to: newSize, allowShrink: allowShrink, preallocation: preallocation) { throw refusal }
        let needed = g.l1EntriesNeeded(size: newSize)
        let oldSize = virtualSize
        try clearUnknownAutoclearBits()
        // Bitmaps first become "in use" so that no crash leaves a table of the wrong
        // size; they get their own size back at the end.
        let consistent = header.autoclearFeatures & Features.autoclearBitmaps != 0 ? bitmaps : []
        if !consistent.isEmpty {
            var inUse = consistent
            for i in inUse.indices { inUse[i].flags |= BitmapDirectoryEntry.flagInUse }
            try replaceBitmapDirectory(inUse)
        }
        let wasPrepared = preparedForWrites
        preparedForWrites = true  // the tail discard is part of the resize, not a tracked write
        defer { preparedForWrites = wasPrepared }
        if newSize < oldSize {
            try discard(at: newSize, length: oldSize - newSize)
            try dropTail(from: newSize)
        }
        if needed > UInt64(l1Table.count) { try growL1(to: Int(needed)) }
        var h = header
        h.size = newSize
        try MetadataTransaction.publishHeader(.size, of: h, in: self)
        header.size = newSize
        if preallocation != .off { try preallocate(preallocation, from: oldSize) }
        if !consistent.isEmpty { try resizeBitmaps(consistent, oldSize: oldSize) }
    }

    /// Why `resize` would be refused (nil: it would go ahead), found without writing
    /// anything. `version`: the image's version when it is resized (default: now).
    public func resizeRefusal(to newSize: UInt64, allowShrink: Bool, preallocation: CreateOptions.Preallocation = .off,
                              version: UInt32? = nil) throws -> QCow2Error? {
        guard newSize % 512 == 0 else {
            return .invalidArgument(path: path, detail: "The new size must be a multiple of 512")
        }
        guard newSize > 0 else { return .invalidArgument(path: path, detail: "New image size must be positive") }
        if let bad = bitmaps.first(where: { $0.inUse }) {
            return .bitmapInconsistent(path: path, bitmap: bad.name)
        }
        if (version ?? header.version) < 3 && !snapshots.isEmpty {
            return .unsupported(path: path, detail: "Can't resize a v2 image which has snapshots")
        }
        guard geometry.l1EntriesNeeded(size: newSize) <= UInt64(Geometry.maxL1Bytes / 8) else {
            return .invalidArgument(path: path, detail: "Failed to grow the L1 table: File too large")
        }
        if preallocation != .off && newSize <= virtualSize {
            return .invalidArgument(path: path, detail: "Preallocation can only be used for growing images")
        }
        if newSize < virtualSize && !allowShrink, try hasAllocation(from: newSize) {
            return .shrinkWouldLoseData(path: path)
        }
        return nil
    }

    /// Whether anything is allocated at or past guest offset `from` in this layer.
    func hasAllocation(from: UInt64) throws -> Bool {
        var pos = from
        while pos < virtualSize {
            let e = try layerExtent(at: pos, maxLength: virtualSize - pos)
            switch e.descriptor {
            case .unallocated(nil), .zero(nil): break
            default: return true
            }
            pos += e.length
        }
        return false
    }

    /// After the tail was discarded: clears the entries past the end so that nothing
    /// there stays referenced (L2 tables wholly past the end are released).
    private func dropTail(from newSize: UInt64) throws {
        let g = geometry
        var tx = try MetadataTransaction(self)
        let keep = g.l1EntriesNeeded(size: newSize)
        for i in Int(keep)..<l1Table.count {
            let l2 = L1Entry(l1Table[i]).l2Offset
            guard l2 != 0 else { continue }
            try tx.clearL1(i..<(i + 1))
            l2Cache.invalidate(l2)
            // The whole range was discarded: its entries reference nothing but zero flags.
            tx.free([l2 >> UInt64(g.clusterBits)])
        }
        // Zero flags left in the kept table past the new end are harmless but useless:
        // clear them so the table says "unallocated" there, as qemu-img leaves it.
        if keep > 0, newSize & (g.bytesPerL2 - 1) != 0 {
            let l1i = Int(keep) - 1
            let l2 = L1Entry(l1Table[l1i]).l2Offset
            if l2 != 0 && L1Entry(l1Table[l1i]).isCopied {
                var table = try map.l2Table(at: l2, l1Index: l1i)
                let first = g.l2Index(newSize - 1) + 1
                var changed = false
                for i in first..<g.l2Entries where map.l2Entry(table, i) != L2Entry(0) {
                    tx.free(map.referencedClusters(map.l2Entry(table, i)))
                    map.setL2Entry(&table, i, L2Entry(0))
                    changed = true
                }
                if changed {
                    try tx.publishL2(table, l1Index: l1i, to: .existing(offset: l2, changed: first..<g.l2Entries), afterData: false)
                }
            }
        }
        try tx.finish()
    }

    /// Moves the active L1 table to a larger one.
    private func growL1(to entries: Int) throws {
        var tx = try MetadataTransaction(self)
        let g = geometry
        let bytes = entries * 8
        let clusters = Int(g.clusters(forBytes: UInt64(bytes)))
        let newOffset = try tx.allocate(clusters)
        try tx.commitRefcounts()
        var w = ByteWriter()
        for e in l1Table { w.u64(e) }
        w.zeros(bytes - w.bytes.count)
        try tx.writeNew(w.bytes, at: newOffset)
        var h = header
        h.l1Size = UInt32(entries)
        h.l1TableOffset = newOffset
        try tx.publishHeader(.l1Table, of: h)
        let oldOffset = header.l1TableOffset
        let oldClusters = g.clusters(forBytes: UInt64(header.l1Size) * 8)
        header.l1Size = UInt32(entries)
        header.l1TableOffset = newOffset
        l1Table += [UInt64](repeating: 0, count: entries - l1Table.count)
        if oldOffset != 0 {
            tx.free((0..<oldClusters).map { (oldOffset >> UInt64(g.clusterBits)) + $0 })
        }
        try tx.finish()
    }

    /// New bitmap tables for the new disk size: entries kept, added ones all-zero,
    /// bits past the new end cleared (in a copy of the last data cluster).
    private func resizeBitmaps(_ entries: [BitmapDirectoryEntry], oldSize: UInt64) throws {
        let tx = try MetadataTransaction(self)
        let g = geometry
        let cs = UInt64(g.clusterSize)
        let cb = UInt64(g.clusterBits)
        var updated: [BitmapDirectoryEntry] = []
        var freeing: [UInt64] = []
        for var e in entries {
            let newCount = Int(BitmapDirectoryEntry.tableSize(diskSize: virtualSize, granularityBits: Int(e.granularityBits), clusterSize: g.clusterSize))
            var table: [UInt64] = []
            let raw = try file.read(count: Int(e.tableSize) * 8, at: e.tableOffset)
            raw.withUnsafeBytes { decodeBigEndianU64($0, into: &table) }
            for w in table.dropFirst(newCount) where w & L2Entry.offsetMask != 0 { freeing.append((w & L2Entry.offsetMask) >> cb) }
            var newTable = Array(table.prefix(newCount)) + [UInt64](repeating: 0, count: max(0, newCount - table.count))
            // Bits past the end of the smaller disk must be zero.
            let bits = (virtualSize + e.granularity - 1) / e.granularity
            let bitsPerCluster = cs * 8
            if virtualSize < oldSize, bits % bitsPerCluster != 0, let lastIndex = newTable.indices.last {
                let w = newTable[lastIndex]
                let off = w & L2Entry.offsetMask
                if off != 0 || w & 1 != 0 {
                    // A data cluster (or an all-ones one) with bits past the end: a cleared copy.
                    var data = off != 0 ? try file.read(count: g.clusterSize, at: off) : [UInt8](repeating: 0xFF, count: g.clusterSize)
                    for b in Int(bits % bitsPerCluster)..<Int(bitsPerCluster) { data[b >> 3] &= ~UInt8(1 << (b & 7)) }
                    let copy = try tx.allocate(1)
                    try tx.commitRefcounts()
                    try tx.writeNew(data, at: copy, durable: false)
                    newTable[lastIndex] = copy
                    if off != 0 { freeing.append(off >> cb) }
                }
            }
            let tableClusters = Int(g.clusters(forBytes: UInt64(newCount * 8)))
            let newTableOffset = try tx.allocate(max(1, tableClusters))
            try tx.commitRefcounts()
            var bytes = ByteWriter()
            for w in newTable { bytes.u64(w) }
            try tx.writeNew(bytes.bytes, at: newTableOffset, durable: false)
            for c in 0..<g.clusters(forBytes: UInt64(e.tableSize) * 8) { freeing.append((e.tableOffset >> cb) + c) }
            e.tableOffset = newTableOffset
            e.tableSize = UInt32(newCount)
            updated.append(e)
        }
        try tx.barrier()
        try replaceBitmapDirectory(updated, freeing: freeing)
    }
}
