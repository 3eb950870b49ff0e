/// The zero clusters of an image being downgraded to version 2 (which has no zero flag)
/// written out as data, as qemu-img's amend does: in every L2 table of the active L1 and
/// of the snapshots', an entry with the zero flag becomes
/// - unallocated, when it has no cluster and the image no backing file (reads as zeros);
/// - a new zero-filled cluster, when it has none and a backing file would show through;
/// - its own cluster filled with zeros, when every reference to that cluster comes through
///   this table; otherwise (the cluster is also data elsewhere) a new zero-filled one.
/// A shared L2 table is changed in place (its entries mean zeros for every sharer) and its
/// new clusters get one reference per reference to the table. Each table is one
/// `MetadataTransaction`: refcounts, zeros, the changed entries, frees last; a crash
/// leaves an image that still reads the same (leaks at worst).
extension QCow2Image {
    /// Expands every zero cluster; the header is the caller's (version 2 written last).
    func expandZeroClusters() throws {
        var l1s: [[UInt64]] = [l1Table]
        for sn in snapshots {
            var t: [UInt64] = []
            let raw = try file.read(count: Int(sn.l1Size) * 8, at: sn.l1TableOffset)
            raw.withUnsafeBytes { decodeBigEndianU64($0, into: &t) }
            l1s.append(t)
        }
        var done = Set<UInt64>()
        for l1 in l1s {
            for (i, e) in l1.enumerated() {
                let offset = L1Entry(e).l2Offset
                guard offset != 0, done.insert(offset).inserted else { continue }
                try expandZeroClusters(inL2At: offset, l1Index: i)
            }
        }
    }

    private func expandZeroClusters(inL2At offset: UInt64, l1Index: Int) throws {
        var table = try map.l2Table(at: offset, l1Index: l1Index)
        let cb = UInt64(geometry.clusterBits)
        var tx = try MetadataTransaction(self)
        let tableRefs = try tx.refcount(offset >> cb)
        // Only L1 tables name an L2 table: the active one and the snapshots'.
        guard (1...UInt64(snapshots.count + 1)).contains(tableRefs) else {
            throw QCow2Error.malformed(path: path, field: "refcount", detail: "L2 table 0x\(String(offset, radix: 16)) has refcount \(tableRefs)")
        }
        var changed: [(Int, L2Entry)] = []
        var zeroed: [UInt64] = []
        for j in 0..<geometry.l2Entries {
            let x = map.l2Entry(table, j)
            guard !x.isCompressed && x.raw & L2Entry.zeroFlag != 0 else { continue }
            let host = x.hostOffset
            if host == 0 && backingFileName == nil {
                changed.append((j, L2Entry(0)))
                continue
            }
            var target = host
            var refs = tableRefs
            if host != 0 {
                refs = try tx.refcount(host >> cb)
            }
            if host == 0 || refs != tableRefs {
                if host != 0 { tx.free(Array(repeating: host >> cb, count: Int(tableRefs))) }
                target = try tx.allocate(1)
                for _ in 1..<tableRefs { try tx.addReference(target >> cb) }
                refs = tableRefs
            }
            zeroed.append(target)
            changed.append((j, L2Entry(target | (refs == 1 ? L2Entry.copied : 0))))
        }
        guard !changed.isEmpty else { return }
        try tx.commitRefcounts()
        if !zeroed.isEmpty {
            let zeros = [UInt8](repeating: 0, count: geometry.clusterSize)
            for c in zeroed { try file.write(zeros, at: c) }
        }
        for (j, e) in changed { map.setL2Entry(&table, j, e) }
        try tx.publishL2(table, l1Index: l1Index, to: .existing(offset: offset, changed: changed.touchedRange), afterData: !zeroed.isEmpty)
        try tx.finish()
    }
}
