/// The write path: data, zero writes and discards.
///
/// Every request is split at L2-table boundaries and each piece is one
/// `MetadataTransaction` (refcounts, data, L2/L1 publication, frees; each step durable
/// before the next, so a crash leaves at worst leaked clusters, and every guest byte
/// reads either its old or its new value). New clusters are filled completely
/// (copy-on-write of the old guest content for partial clusters); in-place writes go to
/// clusters this image owns alone (COPIED).
extension QCow2Image {
    /// Turns on writing; the file must have been opened read-write. A dirty image
    /// (lazy refcounts, not closed cleanly) has its refcounts rebuilt first, as QEMU
    /// does on a read-write open, unless `repairDirty` is false (check -r does it itself).
    func enableWriting(repairDirty: Bool = true, allowCorrupt: Bool = false, report: @escaping (String) -> Void = { _ in }) throws {
        guard file.writable else {
            throw QCow2Error.invalidArgument(path: path, detail: "the image was opened read-only")
        }
        if header.isCorrupt && !allowCorrupt {
            throw QCow2Error.needsRepair(path: path, detail: "image is marked corrupt; it can only be opened read-only")
        }
        let size = try file.size()
        for sn in snapshots {
            if let problem = Self.snapshotL1Problem(sn, g: geometry, fileSize: size) {
                throw QCow2Error.malformed(path: path, field: "snapshot table", detail: "snapshot \(sn.id) (\(sn.name)) \(problem) (snapshot table entry corrupted); the image can only be opened read-only")
            }
        }
        allocator = try Allocator(image: self, lenient: allowCorrupt)
        if header.isDirty && repairDirty {
            let r = try CheckOperation.repair(self, mode: .all, report: report)
            guard r.corruptions == 0 && r.checkErrors == 0 else {
                throw QCow2Error.malformed(path: path, field: "refcounts", detail: "the image was not closed cleanly and could not be repaired")
            }
            try clearDirtyBit()
        }
    }

    /// Writes the feature-bit fields of the header as they are in `header` (one 8-byte
    /// write each, then sync).
    func writeFeatureBits(incompatible: Bool = false, compatible: Bool = false, autoclear: Bool = false) throws {
        for (on, field) in [(incompatible, HeaderField.incompatibleFeatures), (compatible, .compatibleFeatures),
                            (autoclear, .autoclearFeatures)] where on {
            try file.publish(field, of: header)
        }
    }

    /// Clears the dirty and corrupt bits once a check found the image consistent.
    public func clearDirtyBit() throws {
        guard header.isDirty || header.isCorrupt else { return }
        try allocator?.commit()
        try file.sync()
        header.incompatibleFeatures &= ~(Features.dirty | Features.corrupt)
        try writeFeatureBits(incompatible: true)
    }

    func requireAllocator() throws -> Allocator {
        guard let a = allocator else {
            throw QCow2Error.invalidArgument(path: path, detail: "the image is open read-only")
        }
        return a
    }

    /// Once per session, before the first change: clear autoclear bits we do not
    /// implement, and mark enabled bitmaps in use (they are not maintained yet, so
    /// they must not look consistent after our writes).
    func prepareForWrite() throws {
        guard !preparedForWrites else { return }
        try clearUnknownAutoclearBits()
        if bitmapsExtension != nil && header.autoclearFeatures & Features.autoclearBitmaps == 0 {
            // A writer unaware of bitmaps changed the image: the bitmaps are stale for
            // good. Drop the extension, as QEMU does (its clusters are leaks for check -r).
            try dropBitmapsExtension()
        }
        try startTrackingBitmaps()
        preparedForWrites = true
    }

    /// A writer must clear the autoclear bits it does not implement before it changes anything.
    func clearUnknownAutoclearBits() throws {
        guard header.version >= 3 && header.autoclearFeatures & ~Features.autoclearBitmaps != 0 else { return }
        header.autoclearFeatures &= Features.autoclearBitmaps
        try writeFeatureBits(autoclear: true)
    }

    /// Offset in the file of the payload of the first extension of `type`.
    func extensionPayloadOffset(_ type: UInt32) throws -> Int? {
        let c0 = ByteReader(try file.read(count: geometry.clusterSize, at: 0))
        var off = header.length
        let end = header.backingFileOffset != 0 ? Int(header.backingFileOffset) : geometry.clusterSize
        while off + 8 <= end {
            let t = try c0.u32(off, "extension type")
            let len = Int(try c0.u32(off + 4, "extension length"))
            if t == 0 { return nil }
            if t == type { return off + 8 }
            off += 8 + ((len + 7) & ~7)
        }
        return nil
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
        guard UInt64(dir.count) == ext.directorySize, let payload = try extensionPayloadOffset(HeaderExtension.typeBitmaps) else {
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

    // MARK: - Data writes

    /// Runs a change of the image; metadata found inconsistent on the way marks the
    /// image corrupt (incompatible bit 1, as QEMU does) and ends writing in this session.
    func guardingMetadata<T>(_ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let e as QCow2Error {
            guard case .malformed(_, let field, let detail) = e, allocator != nil else { throw e }
            allocator = nil
            header.incompatibleFeatures |= Features.corrupt
            if header.version >= 3 { try? writeFeatureBits(incompatible: true) }
            throw QCow2Error.malformed(path: path, field: field, detail: detail + "; the image has been marked corrupt, further writes are refused")
        }
    }

    /// Writes `data` at guest `offset`.
    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try guardingMetadata { try writeUnguarded(data, at: offset) }
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
        decompressedKey = .max
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }

    /// The L2 table for writing guest range `l1i`: its bytes, its offset (nil when a new
    /// table must be allocated), and the shared table it replaces (copy-on-write).
    func l2TableForWrite(_ l1i: Int) throws -> (table: [UInt8], offset: UInt64?, replaces: UInt64?) {
        let alloc = try requireAllocator()
        let l1e = L1Entry(l1Table[l1i])
        let l2 = l1e.l2Offset
        if l2 == 0 { return ([UInt8](repeating: 0, count: geometry.clusterSize), nil, nil) }
        let table = try l2Table(at: l2, l1Index: l1i)
        let tableRefcount = try alloc.refcount(l2 >> UInt64(geometry.clusterBits))
        if l1e.isCopied || tableRefcount <= 1 {
            return (table, l2, nil)
        }
        // Shared with a snapshot: copy it. A data cluster's refcount counts the L2 tables
        // reaching it per L1, so it is unchanged (the old table now serves the snapshot
        // alone, the copy the active L1); but every such cluster is shared, so the copy's
        // COPIED flags are cleared.
        var copy = table
        for i in 0..<geometry.l2Entries {
            let e = l2Entry(table, i)
            if !e.isCompressed && e.hostOffset != 0 && e.isCopied {
                setL2Entry(&copy, i, L2Entry(e.raw & ~L2Entry.copied, bitmap: e.bitmap))
            }
        }
        return (copy, nil, l2)
    }

    /// Refuses to act on an entry QEMU would consider corrupt: bad descriptors, and
    /// "owned" (COPIED) clusters whose refcount is not 1 — writing there in place
    /// could overwrite other data or metadata.
    func validateForWrite(_ e: L2Entry, index: Int, table: UInt64) throws {
        let g = geometry
        do {
            for sub in 0..<(g.extendedL2 && !e.isCompressed ? 32 : 1) {
                _ = try e.descriptor(geometry: g, subcluster: sub)
            }
        } catch {
            throw QCow2Error.malformed(path: path, field: "L2 entry \(index) of table 0x\(hex(table))", detail: error.detail)
        }
        if !e.isCompressed && e.isCopied && e.hostOffset != 0 {
            let rc = try requireAllocator().refcount(e.hostOffset >> UInt64(g.clusterBits))
            guard rc == 1 else {
                throw QCow2Error.malformed(path: path, field: "L2 entry \(index) of table 0x\(hex(table))",
                                           detail: "cluster 0x\(hex(e.hostOffset)) is marked as owned but its refcount is \(rc)")
            }
        }
    }

    func setL2Entry(_ table: inout [UInt8], _ i: Int, _ e: L2Entry) {
        table.withUnsafeMutableBytes { b in
            if geometry.extendedL2 {
                b.storeBytes(of: e.raw.bigEndian, toByteOffset: i * 16, as: UInt64.self)
                b.storeBytes(of: e.bitmap.bigEndian, toByteOffset: i * 16 + 8, as: UInt64.self)
            } else {
                b.storeBytes(of: e.raw.bigEndian, toByteOffset: i * 8, as: UInt64.self)
            }
        }
    }

    /// Host clusters an entry references (for freeing).
    func referencedClusters(_ e: L2Entry) -> [UInt64] {
        let cb = UInt64(geometry.clusterBits)
        if e.isCompressed {
            let r = e.compressedHostRange(clusterBits: geometry.clusterBits)
            return Array(stride(from: r.start >> cb, to: (r.end + (UInt64(1) << cb) - 1) >> cb, by: 1))
        }
        return e.hostOffset != 0 ? [e.hostOffset >> cb] : []
    }

    /// The current guest content of the cluster at `guest` (zero-filled past the disk end).
    private func clusterContent(_ guest: UInt64) throws -> [UInt8] {
        let cs = geometry.clusterSize
        var buf = [UInt8](repeating: 0, count: cs)
        let n = Int(min(UInt64(cs), virtualSize - guest))
        try buf.withUnsafeMutableBytes { try read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: guest) }
        return buf
    }

    private enum Plan {
        /// Write the covered bytes in place (this image owns the cluster alone).
        case inPlace(host: UInt64)
        /// Fill the owned host cluster, then update the entry (zero-allocated, or extended L2 subclusters).
        case fill(host: UInt64)
        /// Allocate a new cluster, fill it, point the entry at it, free what it replaces.
        case fresh
    }

    private func writeWithinL2(_ data: UnsafeRawBufferPointer, at off: UInt64) throws {
        let g = geometry
        let cs = UInt64(g.clusterSize)
        var tx = try MetadataTransaction(self)
        let l1i = g.l1Index(off)
        guard l1i < l1Table.count else {
            throw QCow2Error.malformed(path: path, field: "l1_size", detail: "L1 table too small for offset \(off)")
        }
        var (table, tableOffset, replaces) = try l2TableForWrite(l1i)
        let end = off + UInt64(data.count)
        let first = g.l2Index(off)
        let last = g.l2Index(end - 1)
        let rangeBase = off & ~(g.bytesPerL2 - 1)

        // Plan each cluster.
        var plans: [(index: Int, plan: Plan, old: L2Entry)] = []
        var freshCount = 0
        for i in first...last {
            let e = l2Entry(table, i)
            try validateForWrite(e, index: i, table: tableOffset ?? 0)
            let plan: Plan
            if e.isCompressed || e.hostOffset == 0 {
                plan = .fresh
            } else if !e.isCopied {
                plan = .fresh  // shared with a snapshot (or COPIED wrongly clear): copy on write
            } else if g.extendedL2 {
                plan = .fill(host: e.hostOffset)
            } else if e.raw & L2Entry.zeroFlag != 0 {
                plan = .fill(host: e.hostOffset)
            } else {
                plan = .inPlace(host: e.hostOffset)
            }
            if case .fresh = plan { freshCount += 1 }
            plans.append((i, plan, e))
        }

        // 1. Refcounts.
        var newTableOffset: UInt64?
        if tableOffset == nil { newTableOffset = try tx.allocate(1) }
        var nextFresh: UInt64 = freshCount > 0 ? try tx.allocate(freshCount) : 0
        try tx.commitRefcounts()

        // 2. Data.
        let scBits = UInt64(g.subclusterBits)
        var updates: [(Int, L2Entry)] = []
        var frees: [UInt64] = []
        // Pieces of `data` going to consecutive host offsets are written with one pwrite.
        var runHost: UInt64 = 0, runStart = 0, runEnd = 0
        func flushRun() throws {
            guard runEnd > runStart else { return }
            try file.write(UnsafeRawBufferPointer(rebasing: data[runStart..<runEnd]), at: runHost)
            runEnd = runStart
        }
        func writeDirect(_ host: UInt64, _ a: Int, _ b: Int) throws {
            if runEnd > runStart && runEnd == a && runHost + UInt64(runEnd - runStart) == host {
                runEnd = b
                return
            }
            try flushRun()
            runHost = host; runStart = a; runEnd = b
        }
        for (i, plan, old) in plans {
            let cg = rangeBase + UInt64(i) * cs
            let s = max(off, cg), e = min(end, cg + cs)
            let src = UnsafeRawBufferPointer(rebasing: data[Int(s - off)..<Int(e - off)])
            let whole = s == cg && e == cg + cs
            // Subclusters the write touches (extended L2).
            let touched: UInt32 = g.extendedL2
                ? Self.subclusterMask(from: Int((s - cg) >> scBits), through: Int((e - 1 - cg) >> scBits)) : 0
            let oldAlloc = UInt32(truncatingIfNeeded: old.bitmap)
            let oldZero = UInt32(truncatingIfNeeded: old.bitmap >> 32)
            switch plan {
            case .inPlace(let host):
                try writeDirect(host + (s - cg), Int(s - off), Int(e - off))
            case .fill(let host):
                if !g.extendedL2 {
                    // A zero cluster with its own host cluster: fill it, then drop the zero flag.
                    var buf = [UInt8](repeating: 0, count: Int(cs))
                    buf.withUnsafeMutableBytes { $0.baseAddress!.advanced(by: Int(s - cg)).copyMemory(from: src.baseAddress!, byteCount: src.count) }
                    try file.write(buf, at: host)
                    updates.append((i, L2Entry(host | L2Entry.copied)))
                } else {
                    // Allocated subclusters in place; the others filled whole, then marked allocated.
                    let missing = touched & ~oldAlloc
                    if missing != 0 {
                        var buf = try clusterContent(cg)
                        buf.withUnsafeMutableBytes { $0.baseAddress!.advanced(by: Int(s - cg)).copyMemory(from: src.baseAddress!, byteCount: src.count) }
                        try writeSubclusters(buf, mask: missing, host: host)
                    }
                    if touched & oldAlloc != 0 {
                        try writeSubclusterPart(src, from: s - cg, mask: touched & oldAlloc, host: host)
                    }
                    let alloc = oldAlloc | touched, zero = oldZero & ~touched
                    if alloc != oldAlloc || zero != oldZero {
                        updates.append((i, L2Entry(host | L2Entry.copied, bitmap: UInt64(zero) << 32 | UInt64(alloc))))
                    }
                }
            case .fresh:
                let host = nextFresh
                nextFresh += cs
                if whole {
                    // A whole new cluster straight from the caller's buffer (with extended
                    // L2, every subcluster becomes allocated and none reads as zero).
                    try writeDirect(host, Int(s - off), Int(e - off))
                    updates.append((i, g.extendedL2 ? L2Entry(host | L2Entry.copied, bitmap: UInt64(UInt32.max))
                                                     : L2Entry(host | L2Entry.copied)))
                    frees += referencedClusters(old)
                    continue
                }
                var content = try clusterContent(cg)
                content.withUnsafeMutableBytes { $0.baseAddress!.advanced(by: Int(s - cg)).copyMemory(from: src.baseAddress!, byteCount: src.count) }
                if !g.extendedL2 {
                    try file.write(content, at: host)
                    updates.append((i, L2Entry(host | L2Entry.copied)))
                } else {
                    var alloc: UInt32, zero: UInt32
                    if old.isCompressed {
                        alloc = .max; zero = 0
                    } else {
                        alloc = oldAlloc | touched; zero = oldZero & ~touched
                    }
                    try writeSubclusters(content, mask: alloc, host: host)
                    updates.append((i, L2Entry(host | L2Entry.copied, bitmap: UInt64(zero) << 32 | UInt64(alloc))))
                }
                frees += referencedClusters(old)
            }
        }

        try flushRun()

        // 3. Publication, 4. frees.
        for (i, e) in updates { setL2Entry(&table, i, e) }
        if let newOffset = newTableOffset {
            try tx.publishL2(table, l1Index: l1i, to: .new(offset: newOffset, replaces: replaces), afterData: true)
        } else if let t = tableOffset, !updates.isEmpty {
            try tx.publishL2(table, l1Index: l1i, to: .existing(offset: t, changed: updates.touchedRange), afterData: true)
        }
        tx.free(frees)
        try tx.finish()
    }

    /// Points L1 entry `i` at `value` (one 8-byte write, then sync).
    func setL1Entry(_ i: Int, _ value: UInt64) throws {
        var w = ByteWriter()
        w.u64(value)
        try file.write(w.bytes, at: header.l1TableOffset + UInt64(i) * 8)
        try file.sync()
        l1Table[i] = value
    }

    static func subclusterMask(from a: Int, through b: Int) -> UInt32 {
        let hi: UInt32 = b >= 31 ? .max : (UInt32(1) << UInt32(b + 1)) - 1
        let lo: UInt32 = (UInt32(1) << UInt32(a)) - 1
        return hi & ~lo
    }

    /// Writes the subclusters of `cluster` (a full cluster's content) selected by `mask`, in runs.
    private func writeSubclusters(_ cluster: [UInt8], mask: UInt32, host: UInt64) throws {
        let sc = 1 << geometry.subclusterBits
        var sub = 0
        while sub < 32 {
            if mask & (1 << UInt32(sub)) == 0 { sub += 1; continue }
            var endSub = sub
            while endSub < 32 && mask & (1 << UInt32(endSub)) != 0 { endSub += 1 }
            try cluster.withUnsafeBytes {
                try file.write(UnsafeRawBufferPointer(rebasing: $0[(sub * sc)..<(endSub * sc)]), at: host + UInt64(sub * sc))
            }
            sub = endSub
        }
    }

    /// Writes the part of `src` (which starts at `start` within the cluster) that falls in the subclusters of `mask`.
    private func writeSubclusterPart(_ src: UnsafeRawBufferPointer, from start: UInt64, mask: UInt32, host: UInt64) throws {
        let sc = UInt64(1) << UInt64(geometry.subclusterBits)
        let end = start + UInt64(src.count)
        for sub in 0..<32 where mask & (1 << UInt32(sub)) != 0 {
            let a = max(start, UInt64(sub) * sc), b = min(end, UInt64(sub + 1) * sc)
            guard a < b else { continue }
            try file.write(UnsafeRawBufferPointer(rebasing: src[Int(a - start)..<Int(b - start)]), at: host + a)
        }
    }
}
