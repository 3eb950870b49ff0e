/// Compressed cluster writes (for convert -c and backup -c): one cluster at a time,
/// packed at byte granularity into shared host clusters. Every host cluster a stream
/// touches holds one reference per stream. Same crash-safe order as other writes:
/// refcounts, data, L2 entry, then frees.
extension QCow2Image {
    /// Writes the cluster at guest `offset` (cluster-aligned) compressed. `data` is the
    /// whole cluster, or the rest of the disk for a final partial cluster. Data that
    /// does not compress is stored as a normal cluster, as QEMU does.
    public func writeCompressed(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkCompressedCluster(data, at: offset)
        let stream = Codec.compressCluster(compressionType, data, clusterSize: geometry.clusterSize)
        try guardingMetadata {
            guard let stream else { return try writeCompressedUnguarded(data, at: offset, stream: nil) }
            try stream.withUnsafeBytes { try writeCompressedUnguarded(data, at: offset, stream: $0) }
        }
    }

    /// Writes the cluster at guest `offset` as `writeCompressed` does, with its stream
    /// compressed by the caller already (`ClusterCompressor`); nil: it does not compress,
    /// and `data` is written as a normal cluster.
    func writeCompressed(_ data: UnsafeRawBufferPointer, stream: UnsafeRawBufferPointer?, at offset: UInt64) throws {
        try guardingMetadata { try writeCompressedUnguarded(data, at: offset, stream: stream) }
    }

    /// Writes consecutive clusters from guest `offset` (cluster-aligned) compressed, with
    /// their streams compressed by the caller already: `streams[k]` is cluster k's (each
    /// smaller than a cluster). One transaction per L2 table the clusters fall in: the
    /// refcounts of all their streams committed once, the streams written with one write
    /// per stretch that is contiguous both in the file and in memory, the L2 entries with
    /// one write; the crash-safe order of one cluster's write is kept.
    func writeCompressed(streams: [UnsafeRawBufferPointer], at offset: UInt64) throws {
        let cs = UInt64(geometry.clusterSize)
        let perTable = geometry.bytesPerL2
        try guardingMetadata {
            var k = 0
            while k < streams.count {
                let guest = offset + UInt64(k) * cs
                // At least one: an unaligned offset is refused by the write itself.
                let n = min(streams.count - k, max(1, Int((perTable - guest % perTable) / cs)))
                try writeCompressedWithinL2(streams[k..<(k + n)], at: guest)
                k += n
            }
        }
    }

    /// Rounds the file length up to a whole sector, as qemu-img convert -c leaves it: a
    /// compressed descriptor counts whole sectors, so the last stream's may end past the
    /// last byte written.
    public func padToSector() throws {
        let n = try file.size()
        if n % 512 != 0 { try file.truncate(to: (n | 511) + 1) }
    }

    /// A compressed write covers exactly one cluster (the last one: up to the end of the disk).
    private func checkCompressedCluster(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        let g = geometry
        guard g.isAligned(offset), data.count == min(g.clusterSize, Int(virtualSize - min(offset, virtualSize))), data.count > 0 else {
            throw QCow2Error.invalidArgument(path: path, detail: "compressed writes must cover exactly one cluster (offset \(offset), \(data.count) bytes)")
        }
        try checkRange(offset, data.count)
    }

    /// `stream`: the compressed cluster (nil: it does not compress).
    private func writeCompressedUnguarded(_ data: UnsafeRawBufferPointer, at offset: UInt64, stream given: UnsafeRawBufferPointer?) throws {
        try checkCompressedCluster(data, at: offset)
        guard let stream = given else { return try writeUnguarded(data, at: offset) }
        try writeCompressedWithinL2([stream][...], at: offset)
    }

    /// Clusters of one L2 table from guest `offset` on, written compressed: refcounts
    /// (a new L2 table first, as QEMU takes it before the streams' bytes, so the files are
    /// laid out alike; each stream into the current packing cluster when it fits, else
    /// into fresh clusters), the streams, the L2 entries, then the frees.
    private func writeCompressedWithinL2(_ streams: ArraySlice<UnsafeRawBufferPointer>, at offset: UInt64) throws {
        let g = geometry
        let cs = UInt64(g.clusterSize)
        let count = UInt64(streams.count)
        guard g.isAligned(offset), count > 0, offset < virtualSize, (virtualSize - offset - 1) / cs + 1 >= count,
              streams.allSatisfy({ $0.baseAddress != nil && $0.count > 0 && UInt64($0.count) < cs }) else {
            throw QCow2Error.invalidArgument(path: path, detail: "compressed writes must cover whole clusters inside the disk, each stream smaller than a cluster (offset \(offset), \(count) clusters)")
        }
        let bytes = min(count * cs, virtualSize - offset)
        try checkRange(offset, Int(bytes))
        let alloc = try requireAllocator()
        try prepareForWrite()
        trackWrite(offset, bytes)
        let l1i = g.l1Index(offset)
        var (table, tableOffset, replaces) = try map.l2TableForWrite(l1i, refcounts: alloc)
        let first = g.l2Index(offset)
        let indices = first..<(first + streams.count)
        for i in indices { try map.validateForWrite(map.l2Entry(table, i), index: i, table: tableOffset ?? 0, refcounts: alloc) }

        // 1. Refcounts.
        var tx = try MetadataTransaction(self)
        let newTableOffset = tableOffset == nil ? try tx.allocate(1) : nil
        var starts: [UInt64] = []
        starts.reserveCapacity(streams.count)
        for s in streams {
            let start = try placeStream(length: UInt64(s.count), tx: tx, refcounts: alloc)
            let end = start + UInt64(s.count)
            guard start < (UInt64(1) << UInt64(70 - g.clusterBits)) else {
                throw QCow2Error.unsupported(path: path, detail: "compressed data would lie beyond the offset range of a compressed descriptor")
            }
            compressedPacking = (host: (end - 1) & ~(cs - 1), used: end - ((end - 1) & ~(cs - 1)))
            starts.append(start)
        }
        try tx.commitRefcounts()

        // 2. Data.
        try writeStreams(streams, at: starts)

        // 3. Publication, 4. frees.
        let x = UInt64(70 - g.clusterBits)
        var frees: [UInt64] = []
        for (k, s) in streams.enumerated() {
            let start = starts[k]
            let nsec = (start + UInt64(s.count) - 1) / 512 - start / 512
            frees += map.referencedClusters(map.l2Entry(table, first + k))
            map.setL2Entry(&table, first + k, L2Entry(L2Entry.compressedFlag | (nsec << x) | start))
        }
        if let t = newTableOffset {
            try tx.publishL2(table, l1Index: l1i, to: .new(offset: t, replaces: replaces), afterData: true)
        } else if let t = tableOffset {
            try tx.publishL2(table, l1Index: l1i, to: .existing(offset: t, changed: indices), afterData: true)
        }
        decompressed.invalidate()
        tx.free(frees)
        try tx.finish()
    }

    /// The streams at their places in the file: one write per run of streams that follow
    /// each other both in the file and in memory.
    private func writeStreams(_ streams: ArraySlice<UnsafeRawBufferPointer>, at starts: [UInt64]) throws {
        let list = Array(streams)
        var a = 0
        while a < list.count {
            guard let base = list[a].baseAddress else { return }
            var n = list[a].count
            var b = a + 1
            while b < list.count, starts[b] == starts[a] + UInt64(n), list[b].baseAddress == base + n {
                n += list[b].count
                b += 1
            }
            try file.write(UnsafeRawBufferPointer(start: base, count: n), at: starts[a])
            a = b
        }
    }

    /// Where a compressed stream of `length` bytes goes, its clusters referenced: right after
    /// the previous stream in the packing cluster while its refcount can take one more (and
    /// on into the next host cluster when that one is free, as QEMU packs them), else fresh
    /// clusters.
    private func placeStream(length len: UInt64, tx: MetadataTransaction, refcounts alloc: Allocator) throws -> UInt64 {
        let g = geometry
        let cs = UInt64(g.clusterSize)
        let packRefcount = try compressedPacking.map { try alloc.refcount($0.host >> UInt64(g.clusterBits)) } ?? 0
        let packing = compressedPacking.flatMap { p -> (host: UInt64, used: UInt64)? in
            guard p.used < cs, packRefcount > 0, packRefcount < alloc.maxRefcount else { return nil }
            return p
        }
        if let p = packing, p.used + len <= cs {
            try tx.addReference(p.host >> UInt64(g.clusterBits))
            return p.host + p.used
        }
        if let p = packing, try tx.allocateIfFree((p.host >> UInt64(g.clusterBits)) + 1) {
            try tx.addReference(p.host >> UInt64(g.clusterBits))
            return p.host + p.used
        }
        return try tx.allocate(Int(g.clusters(forBytes: len)))
    }
}
