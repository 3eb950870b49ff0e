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
        let g = geometry
        let cs = g.clusterSize
        try checkCompressedCluster(data, at: offset)
        let alloc = try requireAllocator()
        try prepareForWrite()
        trackWrite(offset, UInt64(data.count))
        guard let stream = given else {
            try writeUnguarded(data, at: offset)
            return
        }
        let l1i = g.l1Index(offset)
        var (table, tableOffset, replaces) = try map.l2TableForWrite(l1i, refcounts: alloc)
        let index = g.l2Index(offset)
        let old = map.l2Entry(table, index)
        try map.validateForWrite(old, index: index, table: tableOffset ?? 0, refcounts: alloc)

        // 1. Refcounts: a new L2 table first (QEMU takes it before the stream's bytes, so
        //    the files are laid out alike); the stream goes into the current packing
        //    cluster when it fits, else into fresh clusters.
        var tx = try MetadataTransaction(self)
        let newTableOffset = tableOffset == nil ? try tx.allocate(1) : nil
        let start = try placeStream(length: UInt64(stream.count), tx: tx, refcounts: alloc)
        try tx.commitRefcounts()
        let end = start + UInt64(stream.count)
        compressedPacking = (host: (end - 1) & ~UInt64(cs - 1), used: end - ((end - 1) & ~UInt64(cs - 1)))

        // 2. Data.
        try file.write(stream, at: start)
        let x = UInt64(70 - g.clusterBits)
        let nsec = (end - 1) / 512 - start / 512
        guard start < (UInt64(1) << x) else {
            throw QCow2Error.unsupported(path: path, detail: "compressed data would lie beyond the offset range of a compressed descriptor")
        }
        let entry = L2Entry(L2Entry.compressedFlag | (nsec << x) | start)
        map.setL2Entry(&table, index, entry)

        // 3. Publication, 4. frees.
        if let t = newTableOffset {
            try tx.publishL2(table, l1Index: l1i, to: .new(offset: t, replaces: replaces), afterData: true)
        } else if let t = tableOffset {
            try tx.publishL2(table, l1Index: l1i, to: .existing(offset: t, changed: index..<(index + 1)), afterData: true)
        }
        decompressed.invalidate()
        tx.free(map.referencedClusters(old))
        try tx.finish()
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
