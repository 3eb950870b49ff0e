/// Persistent bitmaps on disk: loading a bitmap's data, writing a new set of bitmaps
/// (data clusters only where bits are set, tables, then the directory), and keeping
/// enabled bitmaps in step with guest writes during a read-write session.
///
/// Every change follows one pattern: new clusters written and durable, one small
/// header write switches to them, the old clusters are freed afterwards. A crash
/// leaves either the old set or the new one (and leaked clusters at worst).
extension QCow2Image {
    /// The bitmap data of directory entry `e`.
    public func loadBitmap(_ e: BitmapDirectoryEntry) throws -> DirtyBitmap {
        var bm = DirtyBitmap(granularity: e.granularity, size: virtualSize)
        let cs = geometry.clusterSize
        var table: [UInt64] = []
        let raw = try file.read(count: Int(e.tableSize) * 8, at: e.tableOffset)
        raw.withUnsafeBytes { decodeBigEndianU64($0, into: &table) }
        for (k, w) in table.enumerated() {
            let off = w & L2Entry.offsetMask
            if off != 0 {
                let data = try file.read(count: cs, at: off)
                data.withUnsafeBytes { bm.load(bytes: $0, atByte: UInt64(k) * UInt64(cs)) }
            } else if w & 1 != 0 {
                let bitsPerCluster = UInt64(cs) * 8
                bm.setBits(UInt64(k) * bitsPerCluster, UInt64(k + 1) * bitsPerCluster, to: true)
            }
        }
        return bm
    }

    /// Clusters an entry's table and data occupy.
    func bitmapClusters(_ e: BitmapDirectoryEntry) throws -> [UInt64] {
        let cb = UInt64(geometry.clusterBits)
        var out: [UInt64] = []
        for c in 0..<geometry.clusters(forBytes: UInt64(e.tableSize) * 8) { out.append((e.tableOffset >> cb) + c) }
        var table: [UInt64] = []
        let raw = try file.read(count: Int(e.tableSize) * 8, at: e.tableOffset)
        raw.withUnsafeBytes { decodeBigEndianU64($0, into: &table) }
        // Only entries that can be trusted are freed: an inconsistent bitmap's table was
        // never validated, and freeing a cluster it wrongly names would corrupt the image
        // (a leak is the safe outcome).
        for w in table where w & L2Entry.offsetMask != 0 {
            let off = w & L2Entry.offsetMask
            guard w & 0xFF00_0000_0000_01FF == 0, geometry.isAligned(off), off < fileSize else { continue }
            out.append(off >> cb)
        }
        return out
    }

    /// A bitmap's new table and data clusters, allocated by `allocateBitmapData` in the
    /// transaction of the set that will name them, written by `writeBitmapData`.
    struct NewBitmapData {
        let bitmap: DirtyBitmap
        let tableOffset: UInt64
        /// The new table: the data cluster of each entry that has bits set, else 0.
        let table: [UInt64]
        /// The entries that have a data cluster.
        let used: [Int]
    }

    /// Allocates the table and data clusters of `bitmap` in `tx` (durable with the
    /// transaction's `commitRefcounts`; nothing is written yet).
    func allocateBitmapData(_ bitmap: DirtyBitmap, in tx: MetadataTransaction) throws -> NewBitmapData {
        let g = geometry
        let cs = g.clusterSize
        let entries = Int(BitmapDirectoryEntry.tableSize(diskSize: virtualSize, granularityBits: bitmap.granularity.trailingZeroBitCount, clusterSize: cs))
        var table = [UInt64](repeating: 0, count: entries)
        var used: [Int] = []
        for k in 0..<entries where bitmap.bytes(atByte: UInt64(k) * UInt64(cs), count: cs) != nil { used.append(k) }
        let t = try tx.allocate(max(1, Int(g.clusters(forBytes: UInt64(entries) * 8))))
        for k in used { table[k] = try tx.allocate(1) }
        return NewBitmapData(bitmap: bitmap, tableOffset: t, table: table, used: used)
    }

    /// Writes the data clusters and the table allocated for a bitmap, without a barrier:
    /// the caller makes them durable before anything points at them.
    func writeBitmapData(_ d: NewBitmapData, in tx: MetadataTransaction) throws {
        let cs = geometry.clusterSize
        for k in d.used {
            guard let bytes = d.bitmap.bytes(atByte: UInt64(k) * UInt64(cs), count: cs) else { continue }
            try tx.writeNew(bytes, at: d.table[k], durable: false)
        }
        var w = ByteWriter()
        for e in d.table { w.u64(e) }
        try tx.writeNew(w.bytes, at: d.tableOffset, durable: false)
    }

    /// Lowers bitmap `name` to `lowered`, which holds a subset of its bits, by overwriting
    /// the bitmap's data clusters where they are: nothing is allocated, no table, directory
    /// or header changes and nothing is freed, so a crash at any point leaves a clean image
    /// whose bitmap is a mix of old and lowered bits (correct for a backup that is already
    /// durable: it copied every bit that went). Returns false, having written nothing,
    /// when that is not possible (a table entry stands for "all ones", a data cluster is
    /// shared or lies outside the file, `lowered` sets bits the table has no cluster for);
    /// the caller then takes the ordered commit.
    public func lowerBitmapInPlace(_ name: String, to lowered: DirtyBitmap) throws -> Bool {
        let alloc = try requireAllocator()
        guard header.autoclearFeatures & Features.autoclearBitmaps != 0, bitmapsError == nil,
              let e = bitmaps.first(where: { $0.name == name }), !e.inUse,
              e.granularity == lowered.granularity, lowered.size == virtualSize else { return false }
        let g = geometry
        let cs = g.clusterSize
        var table: [UInt64] = []
        let raw = try file.read(count: Int(e.tableSize) * 8, at: e.tableOffset)
        raw.withUnsafeBytes { decodeBigEndianU64($0, into: &table) }
        guard UInt64(table.count) == BitmapDirectoryEntry.tableSize(diskSize: virtualSize, granularityBits: e.granularity.trailingZeroBitCount, clusterSize: cs) else { return false }
        var writes: [(offset: UInt64, index: Int)] = []
        for (k, w) in table.enumerated() {
            let off = w & L2Entry.offsetMask
            let chunk = lowered.bytes(atByte: UInt64(k) * UInt64(cs), count: cs)
            if off == 0 {
                // No cluster: the bits read as all zeros (or all ones, which cannot be
                // lowered in place unless they stay all ones).
                if w & 1 == 0 { guard chunk == nil else { return false } } else { return false }
                continue
            }
            guard w & 0xFF00_0000_0000_01FF == 0, g.isAligned(off), off <= fileSize, UInt64(cs) <= fileSize - off,
                  try alloc.refcount(off >> UInt64(g.clusterBits)) == 1 else { return false }
            writes.append((off, k))
        }
        try clearUnknownAutoclearBits()
        let zeros = [UInt8](repeating: 0, count: cs)
        try MetadataTransaction(self).overwriteBitmapData(at: writes.map(\.offset)) { k in
            lowered.bytes(atByte: UInt64(writes[k].index) * UInt64(cs), count: cs) ?? zeros
        }
        return true
    }

    /// Writes a new bitmap directory with `in_use` set on every enabled bitmap and
    /// switches the header to it; then frees the old one.
    func markEnabledBitmapsInUse() throws {
        guard bitmapsExtension != nil, header.autoclearFeatures & Features.autoclearBitmaps != 0,
              bitmaps.contains(where: { $0.isAuto && !$0.inUse }) else { return }
        var updated = bitmaps
        for i in updated.indices where updated[i].isAuto { updated[i].flags |= BitmapDirectoryEntry.flagInUse }
        try replaceBitmapDirectory(updated)
    }

    /// Writes `entries` as a new directory in new clusters, makes it durable, points the
    /// bitmaps extension at it with one 8-byte header write, then frees the old directory
    /// (and any `freeing` clusters the old directory referenced).
    func replaceBitmapDirectory(_ entries: [BitmapDirectoryEntry], freeing: [UInt64] = []) throws {
        guard var ext = bitmapsExtension else { return }
        var dir: [UInt8] = []
        for e in entries { e.serialize(into: &dir) }
        guard UInt64(dir.count) == ext.directorySize, let payload = try headers.extensionPayloadOffset(HeaderExtension.typeBitmaps) else {
            throw QCow2Error.malformed(path: path, field: "bitmap directory", detail: "cannot be rewritten")
        }
        var tx = try MetadataTransaction(self)
        let n = Int(geometry.clusters(forBytes: UInt64(dir.count)))
        let newOffset = try tx.allocate(n)
        try tx.commitRefcounts()
        try tx.writeNew(dir, at: newOffset)
        var w = ByteWriter()
        w.u64(newOffset)
        try tx.publishHeader(w.bytes, at: UInt64(payload + 16))
        let old = ext.directoryOffset >> UInt64(geometry.clusterBits)
        // The header names the new directory now: so must memory, before the old one is
        // freed (a failed free must not leave the old directory in use here).
        ext.directoryOffset = newOffset
        bitmapsExtension = ext
        bitmaps = entries
        extensions = extensions.map { if case .bitmaps = $0 { return .bitmaps(ext) } else { return $0 } }
        tx.free((0..<UInt64(n)).map { old + $0 } + freeing)
        try tx.finish()
    }

    /// The extension list with a bitmaps extension `ext` in place of any other: where
    /// QEMU puts it (before the unknown extensions).
    func extensionsWithBitmaps(_ ext: BitmapsExtension) -> [HeaderExtension] {
        var exts = extensions.filter { if case .bitmaps = $0 { return false } else { return true } }
        let insertAt = exts.firstIndex { if case .unknown = $0 { return true } else { return false } } ?? exts.count
        exts.insert(.bitmaps(ext), at: insertAt)
        return exts
    }

    /// The extension list without the bitmaps extension.
    var extensionsWithoutBitmaps: [HeaderExtension] {
        extensions.filter { if case .bitmaps = $0 { return false } else { return true } }
    }

    /// Throws, before anything is written, when the first bitmap's extension would not
    /// fit in the header cluster.
    func checkBitmapsExtensionFits() throws {
        guard bitmapsExtension == nil else { return }
        let ext = BitmapsExtension(nbBitmaps: 1, reserved: 0, directorySize: 0, directoryOffset: 0)
        _ = try headers.layout(header, extensions: extensionsWithBitmaps(ext), backingName: backingFileName)
    }

    /// Replaces the whole set of bitmaps with `entries`, the bitmaps of `newData` (by name)
    /// written to new clusters (their old tables and data freed), then frees `freeing`.
    /// One transaction: the new clusters' refcounts, then the new data, tables and
    /// directory with one barrier, then the switch, then the frees. Handles the extension
    /// appearing (first bitmap) and disappearing (last bitmap removed). Everything is
    /// durable when it returns (each step ends with a barrier).
    func commitBitmapSet(_ entries: [BitmapDirectoryEntry], newData: [String: DirtyBitmap] = [:], freeing: [UInt64]) throws {
        var tx = try MetadataTransaction(self)
        let g = geometry
        var entries = entries
        var freeing = freeing
        var written: [NewBitmapData] = []
        for i in entries.indices {
            guard let bm = newData[entries[i].name] else { continue }
            if entries[i].tableOffset != 0 { freeing += try bitmapClusters(entries[i]) }
            let d = try allocateBitmapData(bm, in: tx)
            entries[i].tableOffset = d.tableOffset
            entries[i].tableSize = UInt32(d.table.count)
            written.append(d)
        }
        let oldDirectory: [UInt64]
        // A stale extension (autoclear bit clear) or one that failed to load was never
        // trusted: its clusters are not freed (check -r reclaims them as leaks).
        if let ext = bitmapsExtension, header.autoclearFeatures & Features.autoclearBitmaps != 0, bitmapsError == nil {
            let first = ext.directoryOffset >> UInt64(g.clusterBits)
            oldDirectory = (0..<g.clusters(forBytes: ext.directorySize)).map { first + $0 }
        } else {
            oldDirectory = []
        }
        if entries.isEmpty {
            // Autoclear bit first: an extension without the bit is merely ignored.
            header.autoclearFeatures &= ~Features.autoclearBitmaps
            try writeFeatureBits(autoclear: true)
            try tx.rewriteHeaderCluster(header, extensions: extensionsWithoutBitmaps, backingName: backingFileName)
            bitmapsExtension = nil
        } else {
            var dir: [UInt8] = []
            for e in entries { e.serialize(into: &dir) }
            let n = Int(g.clusters(forBytes: UInt64(dir.count)))
            let newOffset = try tx.allocate(n)
            try tx.commitRefcounts()
            for d in written { try writeBitmapData(d, in: tx) }
            try tx.writeNew(dir, at: newOffset)
            let ext = BitmapsExtension(nbBitmaps: UInt32(entries.count), reserved: 0,
                                       directorySize: UInt64(dir.count), directoryOffset: newOffset)
            if bitmapsExtension != nil, let payload = try headers.extensionPayloadOffset(HeaderExtension.typeBitmaps) {
                // One 24-byte write switches count, size and offset together.
                var w = ByteWriter()
                w.u32(ext.nbBitmaps); w.u32(0); w.u64(ext.directorySize); w.u64(ext.directoryOffset)
                try tx.publishHeader(w.bytes, at: UInt64(payload))
                extensions = extensions.map { if case .bitmaps = $0 { return .bitmaps(ext) } else { return $0 } }
                if header.autoclearFeatures & Features.autoclearBitmaps == 0 {
                    // The extension was stale (an unaware writer cleared the bit): valid again now.
                    header.autoclearFeatures |= Features.autoclearBitmaps
                    try writeFeatureBits(autoclear: true)
                }
            } else {
                // First bitmap: the extension goes in with the autoclear bit still clear,
                // then the bit is set (the spec's order: never the bit without the extension).
                let exts = extensionsWithBitmaps(ext)
                var h = header
                h.autoclearFeatures &= ~Features.autoclearBitmaps
                try tx.rewriteHeaderCluster(h, extensions: exts, backingName: backingFileName)
                header.autoclearFeatures = h.autoclearFeatures | Features.autoclearBitmaps
                try writeFeatureBits(autoclear: true)
            }
            bitmapsExtension = ext
        }
        bitmaps = entries
        tx.free(oldDirectory + freeing)
        try tx.finish()
    }

    /// Removes a bitmaps extension that cannot be loaded: autoclear bit first, then the
    /// header without the extension. Its clusters are left to the refcount repair.
    func dropBitmapsExtension() throws {
        header.autoclearFeatures &= ~Features.autoclearBitmaps
        try writeFeatureBits(autoclear: true)
        try MetadataTransaction(self).rewriteHeaderCluster(header, extensions: extensionsWithoutBitmaps, backingName: backingFileName)
        bitmapsExtension = nil
        bitmaps = []
        bitmapsError = nil
    }

    // MARK: Tracking guest writes

    /// Loads the enabled, consistent bitmaps for tracking and marks them in use on disk.
    func startTrackingBitmaps() throws {
        guard bitmapsExtension != nil, header.autoclearFeatures & Features.autoclearBitmaps != 0 else { return }
        var tracked: [String: DirtyBitmap] = [:]
        for e in bitmaps where e.isAuto && !e.inUse { tracked[e.name] = try loadBitmap(e) }
        guard !tracked.isEmpty else { return }
        try markEnabledBitmapsInUse()
        trackedBitmaps = tracked
    }

    /// Records a guest write in every tracked bitmap.
    func trackWrite(_ offset: UInt64, _ length: UInt64) {
        guard !trackedBitmaps.isEmpty else { return }
        for k in trackedBitmaps.keys { trackedBitmaps[k]!.set(offset, length) }
    }

    /// Writes the tracked bitmaps back with `in_use` cleared (QEMU's clean close).
    func storeTrackedBitmaps() throws {
        guard !trackedBitmaps.isEmpty else { return }
        var entries = bitmaps
        for i in entries.indices where trackedBitmaps[entries[i].name] != nil {
            entries[i].flags &= ~BitmapDirectoryEntry.flagInUse
        }
        try commitBitmapSet(entries, newData: trackedBitmaps, freeing: [])
        trackedBitmaps = [:]
    }

    /// Ends a read-write session cleanly: everything durable, bitmaps written back.
    public func close() throws {
        guard allocator != nil else { return }
        try storeTrackedBitmaps()
        try flush()
        preparedForWrites = false
    }
}
