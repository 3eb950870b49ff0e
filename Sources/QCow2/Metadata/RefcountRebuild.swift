/// A new refcount structure built from the references a check counted (`check -r all`
/// when the stored one cannot be trusted), laid out as QEMU 7.2 lays it out so the
/// repaired image matches qemu-img's: each refcount block at the first free cluster from
/// the start of the range it covers (in the order of the ranges), then the table at the
/// first free run; if
/// the table needs blocks of its own that make it grow, a larger run is taken and the
/// first one is left counted (a leak the check that follows releases).
///
/// "Free" means counted 0 and not part of the old structure (its table and every
/// block its table names, valid or not), so nothing the image still relies on is
/// overwritten before the header switches to the new structure.
struct RefcountRebuild {
    let g: Geometry
    /// Refcount per host cluster: the counted references, then the new structure's own
    /// (16 bits each, as the check counts them).
    private(set) var counts: [UInt16]
    /// Refcount block index → cluster index of its new block.
    private(set) var blocks: [Int: UInt64] = [:]
    private(set) var tableCluster: UInt64 = 0
    private(set) var tableClusters: UInt64 = 0
    var tableOffset: UInt64 { tableCluster << UInt64(g.clusterBits) }
    private let keep: Set<UInt64>
    private var firstFree: UInt64 = 0

    init(counted: [UInt16], geometry: Geometry, oldStructure: Set<UInt64>) {
        g = geometry
        counts = counted
        keep = oldStructure
    }

    private func isFree(_ c: UInt64) -> Bool {
        (c >= UInt64(counts.count) || counts[Int(c)] == 0) && !keep.contains(c)
    }

    /// The first run of `n` free clusters at or after `from`, now counted 1.
    private mutating func allocate(_ n: UInt64, from: UInt64) -> UInt64 {
        var start = max(from, firstFree)
        while true {
            var k: UInt64 = 0
            while k < n && isFree(start + k) { k += 1 }
            if k == n { break }
            start += k + 1
        }
        let end = Int(start + n)
        if end > counts.count { counts += repeatElement(0, count: end - counts.count) }
        for c in Int(start)..<end { counts[c] = 1 }
        while !isFree(firstFree) { firstFree += 1 }
        return start
    }

    /// Gives a block to every range with a non-zero refcount from cluster `from` on
    /// (blocks allocated on the way are covered too). As QEMU, a block never goes into
    /// the range of a block placed before it in the same pass: each is searched from
    /// its own range's start or the previous block, whichever is further.
    private mutating func placeBlocks(from: UInt64) {
        let perBlock = UInt64(1) << UInt64(g.refblockBits)
        var c = from
        var searchFrom: UInt64 = 0
        while c < UInt64(counts.count) {
            if counts[Int(c)] == 0 { c += 1; continue }
            let bi = Int(c >> UInt64(g.refblockBits))
            if blocks[bi] == nil {
                searchFrom = max(searchFrom, UInt64(bi) * perBlock)
                let b = allocate(1, from: searchFrom)
                blocks[bi] = b
                searchFrom = b
            }
            c = UInt64(bi + 1) * perBlock
        }
    }

    private var neededTableClusters: UInt64 {
        let entries = UInt64((blocks.keys.max() ?? 0) + 1)
        return (entries * 8 + UInt64(g.clusterSize) - 1) / UInt64(g.clusterSize)
    }

    /// Lays the structure out; throws when it cannot describe the counts.
    mutating func layOut(path: String) throws {
        placeBlocks(from: 0)
        while true {
            let n = neededTableClusters
            guard n * UInt64(g.clusterSize) <= UInt64(Geometry.maxRefcountTableBytes) else {
                throw QCow2Error.unsupported(path: path, detail: "the rebuilt refcount table would exceed 8 MiB")
            }
            tableCluster = allocate(n, from: 0)
            tableClusters = n
            placeBlocks(from: tableCluster)
            if neededTableClusters <= n { break }
        }
        let maxValue: UInt64 = g.refcountBits == 64 ? .max : (1 << UInt64(g.refcountBits)) - 1
        if let bad = counts.firstIndex(where: { UInt64($0) > maxValue }) {
            throw QCow2Error.unsupported(path: path, detail: "cluster \(bad) needs a refcount above \(maxValue)")
        }
    }

    /// The content of refcount block `index`.
    func block(_ index: Int) -> [UInt8] {
        var block = [UInt8](repeating: 0, count: g.clusterSize)
        let perBlock = 1 << g.refblockBits
        let first = index * perBlock
        for i in 0..<perBlock where first + i < counts.count {
            let v = counts[first + i]
            if v != 0 { Allocator.store(&block, i, UInt64(v), order: g.refcountOrder) }
        }
        return block
    }

    /// The refcount table's content.
    var table: [UInt8] {
        var w = ByteWriter()
        for i in 0..<Int(tableClusters) * g.clusterSize / 8 {
            w.u64(blocks[i].map { $0 << UInt64(g.clusterBits) } ?? 0)
        }
        return w.bytes
    }
}

extension MetadataTransaction {
    /// Writes a rebuilt refcount structure (blocks and table, made durable) and switches
    /// the header to it. The old structure stays as it was, counted by the new one.
    mutating func rebuildRefcounts(_ r: RefcountRebuild) throws {
        try writeRefcountStructure(r)
        try publishRefcountStructure(tableOffset: r.tableOffset, tableClusters: UInt32(r.tableClusters))
    }

    /// Step 2 of a new refcount structure: its blocks and table written into clusters
    /// the one in force leaves free, then a barrier.
    func writeRefcountStructure(_ r: RefcountRebuild) throws {
        let cb = UInt64(r.g.clusterBits)
        for (index, cluster) in r.blocks.sorted(by: { $0.key < $1.key }) {
            try writeNew(r.block(index), at: cluster << cb, durable: false)
        }
        try writeNew(r.table, at: r.tableOffset, durable: false)
        try barrier()
    }
}
