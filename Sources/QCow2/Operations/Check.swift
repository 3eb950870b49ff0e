/// The result of a consistency check (qemu-img's ImageCheck).
public struct CheckResult: Sendable {
    public var corruptions = 0
    public var leaks = 0
    public var checkErrors = 0
    public var corruptionsFixed = 0
    public var leaksFixed = 0
    public var imageEndOffset: UInt64 = 0
    public var totalClusters: UInt64 = 0
    public var allocatedClusters: UInt64 = 0
    public var fragmentedClusters: UInt64 = 0
    public var compressedClusters: UInt64 = 0

    /// qemu-img check's exit status: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
    public var exitCode: Int32 {
        if checkErrors > 0 { return 1 }
        if corruptions > 0 { return 2 }
        if leaks > 0 { return 3 }
        return 0
    }
}

/// Rebuilds the reference count of every host cluster from the metadata (header,
/// L1/L2 tables of the image and its snapshots, snapshot table, refcount
/// structure, bitmaps) and compares it with the stored refcounts, then checks the
/// COPIED flags, reporting each finding as qemu-img does.
public final class CheckOperation {
    /// What `check -r` may repair.
    public enum Repair: Sendable { case none, leaks, all }

    let image: QCow2Image
    var repair: Repair = .none
    /// qemu-img reports COPIED errors during a repair only as it repairs them.
    var reportCopied = true
    /// Set when a used cluster has refcount 0: only a rebuild of the refcount structure can fix that.
    var needsRebuild = false
    let refcounts: RefcountReader
    let report: (String) -> Void
    var result = CheckResult()
    /// References counted per host cluster (grows for references past the end of the file).
    var references: [UInt16]
    let fileLength: UInt64

    /// `report` receives each diagnostic line (qemu-img prints them on stderr).
    public init(_ image: QCow2Image, report: @escaping (String) -> Void) throws {
        self.image = image
        self.report = report
        self.refcounts = try RefcountReader(image: image)
        let raw = try image.file.size()
        fileLength = (raw + 511) & ~UInt64(511)
        let n = image.geometry.clusters(forBytes: fileLength)
        guard n <= UInt64(Int32.max) else {
            throw QCow2Error.unsupported(path: image.path, detail: "image file is too large to check")
        }
        references = [UInt16](repeating: 0, count: Int(n))
    }

    public static func run(_ image: QCow2Image, report: @escaping (String) -> Void) throws -> CheckResult {
        let op = try CheckOperation(image, report: report)
        return try op.run()
    }

    func run() throws -> CheckResult {
        let g = image.geometry
        let cs = UInt64(g.clusterSize)
        result.totalClusters = g.clusters(forBytes: image.virtualSize)

        // Header cluster.
        count(0, cs)
        // Active L1 and the L2 tables it reaches (with statistics).
        try checkL1(offset: image.header.l1TableOffset, size: image.header.l1Size, active: true,
                    entries: image.l1Table)
        // Snapshots.
        var snapshotTableBytes: UInt64 = 0
        for sn in image.snapshots {
            if let problem = QCow2Image.snapshotL1Problem(sn, g: image.geometry) {
                report("ERROR snapshot \(sn.id) (\(sn.name)) \(problem); snapshot table entry corrupted")
                result.corruptions += 1
            } else {
                try checkL1(offset: sn.l1TableOffset, size: sn.l1Size, active: false, entries: nil)
            }
            let idLen = sn.id.utf8.count, nameLen = sn.name.utf8.count
            snapshotTableBytes += UInt64((SnapshotEntry.fixedSize + sn.extraData.count + idLen + nameLen + 7) & ~7)
        }
        if image.header.nbSnapshots > 0 { count(image.header.snapshotsOffset, snapshotTableBytes) }
        // The LUKS header's clusters.
        if case .luks(let o, let l)? = image.encryption { count(o, l) }
        // Refcount table.
        count(image.header.refcountTableOffset, UInt64(image.header.refcountTableClusters) * cs)
        // Bitmaps.
        if let e = image.bitmapsError {
            report("ERROR bitmaps: \(e.message); the bitmaps cannot be used (qimg check -r all drops them)")
            result.corruptions += 1
        }
        if reportCopied {
            for b in image.bitmaps where b.inUse {
                report("Bitmap '\(b.name)' is inconsistent (in use) and cannot be used; remove it with 'qimg bitmap --remove' or 'qimg check -r all'")
            }
        }
        try countBitmaps()
        // Refcount blocks.
        checkRefblocks()
        // Compare.
        compare()
        try checkCopiedFlags()
        return result
    }

    /// Adds one reference to every cluster that [offset, offset+size) touches.
    func count(_ offset: UInt64, _ size: UInt64) {
        guard size > 0 else { return }
        let g = image.geometry
        let cs = UInt64(g.clusterSize)
        let (end, o) = offset.addingReportingOverflow(size)
        // The last cluster may be partly beyond the end of the file, but not by a whole cluster.
        if o || (end > fileLength && end - fileLength >= cs) {
            report("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x\(hex(offset)) size 0x\(hex(size))")
            result.corruptions += 1
            return
        }
        let first = offset >> UInt64(g.clusterBits)
        let last = (end - 1) >> UInt64(g.clusterBits)
        for k in first...last {
            let i = Int(k)
            if i >= references.count { references.append(contentsOf: repeatElement(0, count: i + 1 - references.count)) }
            if references[i] == UInt16.max {
                report("ERROR: overflow cluster offset=0x\(hex(k << UInt64(g.clusterBits)))")
                result.corruptions += 1
                continue
            }
            references[i] += 1
        }
    }

    func checkL1(offset: UInt64, size: UInt32, active: Bool, entries: [UInt64]?) throws {
        guard size > 0 else { return }
        let bytes = UInt64(size) * 8
        count(offset, bytes)
        var l1 = entries ?? []
        if entries == nil {
            guard offset < Geometry.maxHostOffset else {
                report("ERROR: I/O error in check_refcounts_l1")
                result.checkErrors += 1
                return
            }
            let raw = try image.file.read(count: Int(bytes), at: offset)
            raw.withUnsafeBytes { decodeBigEndianU64($0, into: &l1) }
        }
        for (l1Index, raw) in l1.enumerated() {
            let e = L1Entry(raw)
            if e.hasReservedBits {
                report("ERROR found L1 entry with reserved bits set: \(hex(raw))")
                result.corruptions += 1
            }
            let l2 = e.l2Offset
            if l2 == 0 { continue }
            count(l2, UInt64(image.geometry.clusterSize))
            if !image.geometry.isAligned(l2) {
                report("ERROR l2_offset=\(hex(l2)): Table is not cluster aligned; L1 entry corrupted")
                result.corruptions += 1
            }
            try checkL2(offset: l2, active: active, l1Index: l1Index)
        }
    }

    func readL2(_ offset: UInt64) throws -> [UInt8] {
        try image.file.read(count: image.geometry.clusterSize, at: offset)
    }

    /// Reads an L2 table once: counts its references, gathers statistics, and (for the
    /// active L1) notes the entries whose COPIED flag disagrees with the stored refcount,
    /// reported later by `checkCopiedFlags` in qemu-img's order.
    func checkL2(offset: UInt64, active: Bool, l1Index: Int) throws {
        // A table past the end of the file reads as zeros: nothing in it to count.
        guard offset < fileLength else { return }
        let g = image.geometry
        let cs = UInt64(g.clusterSize)
        let table = try readL2(offset)
        let external = image.hasExternalDataFile
        var nextContiguous: UInt64 = 0
        for i in 0..<g.l2Entries {
            let e = image.l2Entry(table, i)
            if !e.isCompressed && e.raw & L2Entry.reservedStandard != 0 {
                report("ERROR found l2 entry with reserved bits set: \(hex(e.raw))")
                result.corruptions += 1
            }
            if e.isCompressed {
                if e.isCopied {
                    let f = e.compressedFields(clusterBits: g.clusterBits)
                    report("ERROR: coffset=0x\(hex(f.offset)): copied flag must never be set for compressed clusters")
                    result.corruptions += 1
                }
                if g.extendedL2 && e.bitmap != 0 {
                    report("ERROR compressed cluster \(i) with non-zero subcluster allocation bitmap, entry=0x\(hex(e.raw))")
                    result.corruptions += 1
                    continue
                }
                let r = e.compressedHostRange(clusterBits: g.clusterBits)
                let f = e.compressedFields(clusterBits: g.clusterBits)
                count(f.offset, r.end - f.offset)
                if active {
                    result.allocatedClusters += 1
                    result.compressedClusters += 1
                    result.fragmentedClusters += 1
                }
                continue
            }
            let host = e.hostOffset
            let zeroFlag = !g.extendedL2 && e.raw & L2Entry.zeroFlag != 0
            if host == 0 && !(external && e.isCopied) {
                if g.extendedL2 && UInt32(truncatingIfNeeded: e.bitmap) != 0 {
                    report("ERROR: Unallocated cluster has non-zero subcluster allocation bitmap")
                    result.corruptions += 1
                }
                continue
            }
            // Normal or zero with a preallocated host cluster.
            if g.extendedL2 && (e.bitmap >> 32) & e.bitmap != 0 {
                report("ERROR offset=\(hex(host)): Allocated cluster has corrupted subcluster allocation bitmap")
                result.corruptions += 1
            }
            if !g.isAligned(host) {
                result.corruptions += 1
                let containsData = g.extendedL2 ? UInt32(truncatingIfNeeded: e.bitmap) != 0 : !zeroFlag
                if containsData {
                    report("ERROR offset=\(hex(host)): Data cluster is not properly aligned; L2 entry corrupted.")
                } else {
                    report("ERROR offset=\(hex(host)): Preallocated cluster is not properly aligned; L2 entry corrupted.")
                }
            }
            if active {
                result.allocatedClusters += 1
                if nextContiguous != 0 && host != nextContiguous { result.fragmentedClusters += 1 }
                nextContiguous = host &+ cs
                // Clusters of an external data file have no refcounts: QEMU takes them as 1.
                let refcount = external ? 1 : try? refcounts.refcount(ofCluster: host >> UInt64(g.clusterBits))
                if let rc = refcount, (rc == 1) != e.isCopied {
                    wrongCopiedByL1[l1Index, default: []].append((offset, i, rc == 1 ? e.raw | L2Entry.copied : e.raw & ~L2Entry.copied, rc))
                }
            }
            if !external { count(host, cs) }
        }
    }

    func countBitmaps() throws {
        guard let ext = image.bitmapsExtension, !image.bitmaps.isEmpty else { return }
        count(ext.directoryOffset, ext.directorySize)
        let g = image.geometry
        for b in image.bitmaps {
            let bytes = UInt64(b.tableSize) * 8
            count(b.tableOffset, bytes)
            var done = 0
            let total = Int(b.tableSize)
            var words: [UInt64] = []
            while done < total {
                let n = min(8192, total - done)
                let raw = try image.file.read(count: n * 8, at: b.tableOffset + UInt64(done * 8))
                raw.withUnsafeBytes { decodeBigEndianU64($0, into: &words) }
                for w in words {
                    let off = w & 0x00FF_FFFF_FFFF_FE00
                    if w & 0xFF00_0000_0000_01FE != 0 || !g.isAligned(off) {
                        report("ERROR bitmap table entry 0x\(hex(w)) of bitmap '\(b.name)' is invalid")
                        result.corruptions += 1
                        continue
                    }
                    if off != 0 { count(off, UInt64(g.clusterSize)) }
                }
                done += n
            }
        }
    }

    func checkRefblocks() {
        let g = image.geometry
        for (i, raw) in refcounts.table.enumerated() {
            let off = raw & RefcountReader.offsetMask
            if !g.isAligned(off) {
                report("ERROR refcount block \(i) is not cluster aligned; refcount table entry corrupted")
                result.corruptions += 1
                continue
            }
            let cluster = off >> UInt64(g.clusterBits)
            if cluster >= UInt64(references.count) {
                report("ERROR refcount block \(i) is outside image")
                result.corruptions += 1
                continue
            }
            if off != 0 {
                count(off, UInt64(g.clusterSize))
                let r = references[Int(cluster)]
                if r != 1 {
                    report("ERROR refcount block \(i) refcount=\(r)")
                    result.corruptions += 1
                }
            }
        }
    }

    /// Stored refcounts that differ from the counted references: (cluster, stored, counted).
    var mismatches: [(UInt64, UInt64, UInt64)] = []

    func compare() {
        var highest: Int64 = -1
        for i in 0..<references.count {
            let stored: UInt64
            do { stored = try refcounts.refcount(ofCluster: UInt64(i)) } catch {
                report("Can't get refcount for cluster \(i): Input/output error")
                result.checkErrors += 1
                continue
            }
            let counted = UInt64(references[i])
            if stored > 0 || counted > 0 { highest = Int64(i) }
            if stored != counted {
                mismatches.append((UInt64(i), stored, counted))
                if stored == 0 { needsRebuild = true }
                if stored < counted {
                    report("ERROR cluster \(i) refcount=\(stored) reference=\(counted)")
                    result.corruptions += 1
                } else {
                    report("Leaked cluster \(i) refcount=\(stored) reference=\(counted)")
                    result.leaks += 1
                }
            }
        }
        result.imageEndOffset = UInt64(highest + 1) << UInt64(image.geometry.clusterBits)
    }

    /// Entries whose COPIED flag disagrees with the refcount: (index, corrected value, refcount).
    var wrongL1: [(Int, UInt64, UInt64)] = []
    var wrongL2: [(UInt64, Int, UInt64, UInt64)] = []
    /// The same, in qemu-img's order: each L1 entry, then the entries of its table.
    enum WrongCopied {
        case l1(index: Int, corrected: UInt64, refcount: UInt64)
        case l2(table: UInt64, index: Int, corrected: UInt64, refcount: UInt64)
    }
    var wrongCopied: [WrongCopied] = []
    /// Per active L1 index: (table, entry index, corrected entry, refcount) found by checkL2.
    var wrongCopiedByL1: [Int: [(UInt64, Int, UInt64, UInt64)]] = [:]

    func checkCopiedFlags() throws {
        let g = image.geometry
        for (i, raw) in image.l1Table.enumerated() {
            let l1 = L1Entry(raw)
            let l2 = l1.l2Offset
            if l2 == 0 { continue }
            if let rc = try? refcounts.refcount(ofCluster: l2 >> UInt64(g.clusterBits)), (rc == 1) != l1.isCopied {
                if reportCopied { report("ERROR OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(hex(raw)) refcount=\(rc)") }
                result.corruptions += 1
                wrongL1.append((i, rc == 1 ? raw | L1Entry.copied : raw & ~L1Entry.copied, rc))
                wrongCopied.append(.l1(index: i, corrected: rc == 1 ? raw | L1Entry.copied : raw & ~L1Entry.copied, refcount: rc))
            }
            // The table's entries were compared with their refcounts by checkL2.
            for (table, j, corrected, rc) in wrongCopiedByL1[i] ?? [] {
                if reportCopied { report("ERROR OFLAG_COPIED data cluster: l2_entry=\(hex(corrected ^ L2Entry.copied)) refcount=\(rc)") }
                result.corruptions += 1
                wrongL2.append((table, j, corrected, rc))
                wrongCopied.append(.l2(table: table, index: j, corrected: corrected, refcount: rc))
            }
        }
    }
}

// MARK: - Repair

extension CheckOperation {
    /// `qemu-img check -r leaks|all`: checks, repairs what `repair` allows, then checks
    /// again. Returns the second check's result with the fixed counts filled in.
    /// The image must be open for writing.
    public static func repair(_ image: QCow2Image, mode: Repair, report: @escaping (String) -> Void) throws -> CheckResult {
        let alloc = try image.requireAllocator()
        var bitmapFixes = 0
        if mode == .all {
            if let e = image.bitmapsError {
                report("ERROR bitmaps: \(e.message)")
                report("Repairing bitmaps: dropping the bitmaps extension (its clusters are then leaked and released)")
                try image.dropBitmapsExtension()
                bitmapFixes += 1
            }
            let inUse = image.bitmaps.filter(\.inUse)
            if !inUse.isEmpty {
                var freeing: [UInt64] = []
                for b in inUse {
                    report("Repairing bitmap '\(b.name)': removing the inconsistent bitmap")
                    freeing += (try? image.bitmapClusters(b)) ?? []
                }
                try image.commitBitmapSet(image.bitmaps.filter { !$0.inUse }, freeing: freeing)
                bitmapFixes += inUse.count
            }
        }
        let first = try CheckOperation(image, report: report)
        first.repair = mode
        first.reportCopied = mode == .none
        let r1 = try first.run()
        var leaksFixed = 0, corruptionsFixed = 0
        if mode != .none && (r1.leaks > 0 || r1.corruptions > 0) {
            if first.needsRebuild {
                guard mode == .all else {
                    report("ERROR need to rebuild refcount structures")
                    throw QCow2Error.unsupported(path: image.path, detail: "Check failed: the refcount structure must be rebuilt, which only -r all does")
                }
                report("Rebuilding refcount structure")
                let oldStructure = try image.rebuildRefcounts(counted: first.references)
                for c in oldStructure { report("Repairing cluster \(c) refcount=1 reference=0") }
                leaksFixed = first.mismatches.filter { $0.1 > $0.2 }.count
                corruptionsFixed = first.mismatches.filter { $0.1 < $0.2 }.count
            } else {
                for (c, stored, counted) in first.mismatches {
                    let leak = stored > counted
                    guard leak || mode == .all else {
                        report("ERROR cluster \(c) refcount=\(stored) reference=\(counted)")
                        continue
                    }
                    report("Repairing cluster \(c) refcount=\(stored) reference=\(counted)")
                    try alloc.forceRefcount(c, counted)
                    if leak { leaksFixed += 1 } else { corruptionsFixed += 1 }
                }
                try alloc.commit()
            }
        }
        if mode != .none && (leaksFixed + corruptionsFixed > 0 || !first.wrongL1.isEmpty || !first.wrongL2.isEmpty) {
            // Refcounts are right now: make the COPIED flags follow them, as qemu-img does:
            // -r all always; -r leaks only when nothing else is left wrong (no refcount
            // corruption, leak or check error); each L1 entry, then its table's entries.
            let again = try CheckOperation(image, report: { _ in })
            let r = try again.run()
            let otherCorruptions = r.corruptions - again.wrongCopied.count
            let fix = mode == .all || (r.checkErrors == 0 && r.leaks == 0 && otherCorruptions == 0)
            var wroteL2 = false
            for event in again.wrongCopied {
                switch event {
                case .l1(let i, let value, let rc):
                    let line = "OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(hex(value ^ L1Entry.copied)) refcount=\(rc)"
                    guard fix else { report("ERROR " + line); continue }
                    if wroteL2 { try image.file.sync(); wroteL2 = false }
                    try image.setL1Entry(i, value)
                    report("Repairing " + line)
                case .l2(let l2, let j, let value, let rc):
                    let line = "OFLAG_COPIED data cluster: l2_entry=\(hex(value ^ L2Entry.copied)) refcount=\(rc)"
                    guard fix else { report("ERROR " + line); continue }
                    var w = ByteWriter()
                    w.u64(value)
                    try image.file.write(w.bytes, at: l2 + UInt64(j * image.geometry.l2EntrySize))
                    image.l2Cache.invalidate(l2)
                    wroteL2 = true
                    report("Repairing " + line)
                }
                corruptionsFixed += 1
            }
            try image.file.sync()
        }
        corruptionsFixed += bitmapFixes
        guard leaksFixed > 0 || corruptionsFixed > 0 else { return r1 }
        var r2 = try CheckOperation(image, report: report).run()
        r2.leaksFixed = leaksFixed
        r2.corruptionsFixed = corruptionsFixed
        return r2
    }
}

extension QCow2Image {
    /// Replaces the refcount structure with a new one built from `counted`
    /// (references per host cluster, as a check computed them): new blocks and
    /// table after the end of the file, durable, then one header write switches to
    /// them. The old structure's clusters end up with refcount 0.
    @discardableResult
    func rebuildRefcounts(counted: [UInt16]) throws -> [UInt64] {
        let g = geometry
        let cs = UInt64(g.clusterSize)
        let cb = UInt64(g.clusterBits)
        var counts = counted.map(UInt64.init)
        func drop(_ c: UInt64) { if c < UInt64(counts.count), counts[Int(c)] > 0 { counts[Int(c)] -= 1 } }
        // The old table and blocks are no longer referenced.
        let old = try RefcountReader(image: self)
        var oldClusters: [UInt64] = []
        for c in 0..<UInt64(header.refcountTableClusters) { oldClusters.append((header.refcountTableOffset >> cb) + c) }
        for e in old.table where e & RefcountReader.offsetMask != 0 { oldClusters.append((e & RefcountReader.offsetMask) >> cb) }
        oldClusters.forEach(drop)
        // Lay out the new blocks and table after everything, large enough to describe themselves.
        let perBlock = UInt64(1) << UInt64(g.refblockBits)
        let start = max(UInt64(counts.count), g.clusters(forBytes: try file.size()))
        var blocks: UInt64 = 1, tableClusters: UInt64 = 1
        while true {
            let total = start + blocks + tableClusters
            let b = (total + perBlock - 1) / perBlock
            let t = (b * 8 + cs - 1) / cs
            if b == blocks && t == tableClusters { break }
            blocks = b
            tableClusters = t
        }
        guard tableClusters * cs <= UInt64(Geometry.maxRefcountTableBytes) else {
            throw QCow2Error.unsupported(path: path, detail: "the rebuilt refcount table would exceed 8 MiB")
        }
        let total = start + blocks + tableClusters
        counts += [UInt64](repeating: 0, count: Int(total) - counts.count)
        for c in start..<total { counts[Int(c)] = 1 }
        let maxValue: UInt64 = g.refcountBits == 64 ? .max : (1 << UInt64(g.refcountBits)) - 1
        if let bad = counts.firstIndex(where: { $0 > maxValue }) {
            throw QCow2Error.unsupported(path: path, detail: "cluster \(bad) needs a refcount above \(maxValue)")
        }
        var table = [UInt8](repeating: 0, count: Int(tableClusters * cs))
        for bi in 0..<blocks {
            var block = [UInt8](repeating: 0, count: g.clusterSize)
            let first = bi * perBlock
            for i in 0..<perBlock where first + i < total {
                let v = counts[Int(first + i)]
                if v != 0 { Allocator.store(&block, Int(i), v, order: g.refcountOrder) }
            }
            let off = (start + bi) << cb
            try file.write(block, at: off)
            table.withUnsafeMutableBytes { $0.storeBytes(of: off.bigEndian, toByteOffset: Int(bi) * 8, as: UInt64.self) }
        }
        let tableOffset = (start + blocks) << cb
        try file.write(table, at: tableOffset)
        try file.sync()
        var h = header
        h.refcountTableOffset = tableOffset
        h.refcountTableClusters = UInt32(tableClusters)
        try file.publish(.refcountTable, of: h)
        header.refcountTableOffset = tableOffset
        header.refcountTableClusters = UInt32(tableClusters)
        fileSize = try file.size()
        allocator = try Allocator(image: self)
        return oldClusters.sorted()
    }
}
