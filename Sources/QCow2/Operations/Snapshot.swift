/// Internal snapshots (qemu-img snapshot -c, -a, -d; -l is the table itself).
///
/// References are counted as QEMU counts them: every L1 table (the active one and each
/// snapshot's) adds one reference to each L2 table it names and to each data cluster
/// those tables name (a compressed cluster to each host cluster its bytes touch), even
/// when two L1 tables share an L2 table. COPIED (bit 63) on active L1/L2 entries says
/// "refcount 1": writes go in place only there and copy everything else.
///
/// Order (each step durable before the next):
/// - create: COPIED cleared on the active tables (the clusters are about to be shared:
///   from here writers copy), then the active tree's refcounts raised and the snapshot's
///   L1 copy and the new table allocated, the copy and the table written, the header
///   switched (nb_snapshots, snapshots_offset), the old table freed;
/// - delete: the new table written and switched to, then the snapshot's references
///   released (table by table), its L1 table and the old snapshot table freed, then
///   COPIED set where a refcount fell to 1;
/// - apply: the snapshot's tree gains the active image's references and a new active
///   L1 table is written (the snapshot's entries, COPIED clear), the header switched to
///   it and to the snapshot's disk size in one write, then the old active tree's
///   references released and COPIED set where a refcount is 1.
/// A crash leaves at worst leaked clusters, or COPIED clear on a cluster whose refcount is
/// 1 (writers copy it needlessly; `check -r all` sets the flag again).
public enum SnapshotOperation {
    /// Creates snapshot `name` of the active image, dated `date` (seconds, nanoseconds),
    /// with qemu-img's values: VM clock 0, VM state size 0, icount 0, the disk size.
    @discardableResult
    public static func create(_ image: QCow2Image, name: String, date: (seconds: UInt32, nanoseconds: UInt32)) throws -> SnapshotEntry {
        let alloc = try image.requireAllocator()
        var table = SnapshotTable(image.snapshots)
        let g = image.geometry
        let l1 = image.l1Table
        var entry = SnapshotEntry(id: table.nextID, name: name, l1TableOffset: 0, l1Size: UInt32(l1.count),
                                  diskSize: image.virtualSize, dateSeconds: date.seconds, dateNanoseconds: date.nanoseconds)
        if let problem = table.problemAdding(entry) { throw QCow2Error.unsupported(path: image.path, detail: problem) }
        try ReferenceWalk(image: image, l1: l1).checkCanShare(alloc)
        try image.clearUnknownAutoclearBits()
        var tx = try MetadataTransaction(image)
        try CopiedFlags(image: image, tx: tx).sync(assumeShared: true)
        // An empty L1 table (a disk of size 0) takes no cluster: offset 0, as QEMU writes it.
        let copyOffset = l1.isEmpty ? 0 : try tx.allocate(Int(g.clusters(forBytes: UInt64(l1.count) * 8)))
        try ReferenceWalk(image: image, l1: l1).forEachTable { l2, data in
            for c in [l2] + data { try tx.addReference(c) }
        }
        entry.l1TableOffset = copyOffset
        table.append(entry)
        // The snapshot's L1 table: the active entries without COPIED (nothing in it is owned).
        var w = ByteWriter()
        for e in l1 { w.u64(e & ~L1Entry.copied) }
        try tx.commitRefcounts()
        if !l1.isEmpty { try tx.writeNew(w.bytes, at: copyOffset, durable: false) }
        try tx.publishSnapshotTable(table)
        try tx.finish()
        image.compressedPacking = nil
        return entry
    }

    /// Deletes the first snapshot named `name` (qemu-img looks snapshots up by name to
    /// delete them).
    public static func delete(_ image: QCow2Image, name: String) throws {
        _ = try image.requireAllocator()
        var table = SnapshotTable(image.snapshots)
        guard let i = table.index(name: name) else { throw QCow2Error.snapshotNotFound(path: image.path, snapshot: name) }
        let sn = table.entries[i]
        let l1 = try snapshotL1(image, sn)
        try ReferenceWalk(image: image, l1: l1).validate()
        try image.clearUnknownAutoclearBits()
        var tx = try MetadataTransaction(image)
        table.remove(at: i)
        try tx.publishSnapshotTable(table)
        try tx.finish()
        try ReferenceWalk(image: image, l1: l1).forEachTable { l2, data in try tx.releaseNow([l2] + data) }
        let start = sn.l1TableOffset >> UInt64(image.geometry.clusterBits)
        try tx.releaseNow((0..<image.geometry.clusters(forBytes: UInt64(sn.l1Size) * 8)).map { start + $0 })
        try CopiedFlags(image: image, tx: tx).sync(assumeShared: false)
        image.compressedPacking = nil
    }

    /// Makes the snapshot with ID `idOrName` (else the first named so) the active image:
    /// its data and its disk size. Refused while the image has persistent bitmaps, as in
    /// qemu-img.
    public static func apply(_ image: QCow2Image, idOrName: String) throws {
        let alloc = try image.requireAllocator()
        // qemu-img looks at the bitmaps first.
        guard image.bitmaps.isEmpty else {
            throw QCow2Error.unsupported(path: image.path, detail: "Device has active dirty bitmaps")
        }
        let table = SnapshotTable(image.snapshots)
        guard let i = table.index(idOrName: idOrName) else {
            throw QCow2Error.snapshotNotFound(path: image.path, snapshot: idOrName)
        }
        let sn = table.entries[i]
        let g = image.geometry
        let size = sn.diskSize ?? image.header.size
        let snL1 = try snapshotL1(image, sn)
        let count = max(snL1.count, Int(g.l1EntriesNeeded(size: size)))
        guard UInt64(count) * 8 <= UInt64(Geometry.maxL1Bytes) else {
            throw QCow2Error.malformed(path: image.path, field: "snapshot \(sn.id)", detail: "disk size \(size) needs too large an L1 table")
        }
        try ReferenceWalk(image: image, l1: snL1).checkCanShare(alloc)
        let oldL1 = image.l1Table
        try image.clearUnknownAutoclearBits()
        var tx = try MetadataTransaction(image)
        try ReferenceWalk(image: image, l1: snL1).forEachTable { l2, data in
            for c in [l2] + data { try tx.addReference(c) }
        }
        let newL1 = snL1.map { $0 & ~L1Entry.copied } + [UInt64](repeating: 0, count: count - snL1.count)
        // An empty table keeps its place (nothing is allocated or freed for it).
        let offset = count == 0 ? image.header.l1TableOffset : try tx.allocate(Int(g.clusters(forBytes: UInt64(count) * 8)))
        try tx.commitRefcounts()
        var w = ByteWriter()
        for e in newL1 { w.u64(e) }
        if count > 0 { try tx.writeNew(w.bytes, at: offset) }
        try tx.publishActiveL1(newL1, at: offset, size: size)
        try tx.finish()
        try ReferenceWalk(image: image, l1: oldL1).forEachTable { l2, data in try tx.releaseNow([l2] + data) }
        try CopiedFlags(image: image, tx: tx).sync(assumeShared: false)
        image.compressedPacking = nil
        image.decompressed.invalidate()
    }

    /// A snapshot's L1 table, read after checking where it is.
    static func snapshotL1(_ image: QCow2Image, _ sn: SnapshotEntry) throws -> [UInt64] {
        if let problem = QCow2Image.snapshotL1Problem(sn, g: image.geometry, fileSize: try image.file.size()) {
            throw QCow2Error.malformed(path: image.path, field: "snapshot \(sn.id)", detail: problem)
        }
        var l1: [UInt64] = []
        if sn.l1Size > 0 {
            let raw = try image.file.read(count: Int(sn.l1Size) * 8, at: sn.l1TableOffset)
            raw.withUnsafeBytes { decodeBigEndianU64($0, into: &l1) }
        }
        return l1
    }
}

/// The clusters one L1 table references, one L2 table at a time: the table itself and
/// the data clusters its entries name (a compressed one: each host cluster it touches).
struct ReferenceWalk {
    let image: QCow2Image
    let l1: [UInt64]

    func forEachTable(_ body: (_ l2: UInt64, _ data: [UInt64]) throws -> Void) throws {
        let g = image.geometry
        let cb = UInt64(g.clusterBits)
        for (i, raw) in l1.enumerated() {
            let l2 = L1Entry(raw).l2Offset
            guard l2 != 0 else { continue }
            let t = try image.map.l2Table(at: l2, l1Index: i)
            var data: [UInt64] = []
            for j in 0..<g.l2Entries {
                let e = image.l2Entry(t, j)
                guard e.raw != 0 else { continue }
                do {
                    for sub in 0..<(g.extendedL2 && !e.isCompressed ? 32 : 1) { _ = try e.descriptor(geometry: g, subcluster: sub) }
                } catch {
                    throw QCow2Error.malformed(path: image.path, field: "L2 entry \(j) of table 0x\(hex(l2))", detail: error.detail)
                }
                data += image.map.referencedClusters(e)
            }
            try body(l2 >> cb, data)
        }
    }

    /// Reads the whole tree, changing nothing (bad tables or entries throw).
    func validate() throws { try forEachTable { _, _ in } }

    /// Every cluster of the tree is in use and can take one more reference (checked
    /// before anything changes; a 1-bit refcount cannot).
    func checkCanShare(_ alloc: Allocator) throws {
        try forEachTable { l2, data in
            for c in [l2] + data {
                let rc = try alloc.refcount(c)
                guard rc > 0 else {
                    throw QCow2Error.malformed(path: image.path, field: "refcount", detail: "cluster \(c) is referenced but has refcount 0")
                }
                guard rc < alloc.maxRefcount else {
                    throw QCow2Error.unsupported(path: image.path,
                                                 detail: "the refcount of cluster \(c) would exceed the maximum (\(alloc.maxRefcount)) of \(image.geometry.refcountBits)-bit refcounts")
                }
            }
        }
    }
}

/// COPIED (bit 63) on the active L1 table and its L2 tables made to say "refcount 1".
struct CopiedFlags {
    let image: QCow2Image
    let tx: MetadataTransaction

    /// `assumeShared`: clear every flag (the clusters are about to gain a reference);
    /// otherwise set each from the refcount as it is now.
    func sync(assumeShared: Bool) throws {
        let alloc = try image.requireAllocator()
        let g = image.geometry
        let cb = UInt64(g.clusterBits)
        var l1 = image.l1Table
        var tx = tx
        var lo = l1.count, hi = 0
        for (i, raw) in l1.enumerated() {
            let l2 = L1Entry(raw).l2Offset
            guard l2 != 0 else { continue }
            var t = try image.map.l2Table(at: l2, l1Index: i)
            var changed: [(Int, L2Entry)] = []
            for j in 0..<g.l2Entries {
                let e = image.l2Entry(t, j)
                guard !e.isCompressed, e.hostOffset != 0 else { continue }
                let owned = try !assumeShared && alloc.refcount(e.hostOffset >> cb) == 1
                if owned != e.isCopied {
                    changed.append((j, L2Entry(owned ? e.raw | L2Entry.copied : e.raw & ~L2Entry.copied, bitmap: e.bitmap)))
                }
            }
            if !changed.isEmpty {
                for (j, e) in changed { image.map.setL2Entry(&t, j, e) }
                try tx.publishL2(t, l1Index: i, to: .existing(offset: l2, changed: changed.touchedRange), afterData: false)
            }
            let owned = try !assumeShared && alloc.refcount(l2 >> cb) == 1
            if owned != L1Entry(raw).isCopied {
                l1[i] = owned ? raw | L1Entry.copied : raw & ~L1Entry.copied
                lo = min(lo, i); hi = max(hi, i + 1)
            }
        }
        if lo < hi { try tx.updateL1(l1, changed: lo..<hi) }
    }
}
