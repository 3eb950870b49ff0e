#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

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
    /// Persistent bitmaps found in use (inconsistent): a caller may advise removing them.
    public var inconsistentBitmaps: [String] = []

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
    /// Set when the refcount structure itself is wrong (a used cluster with refcount 0, a
    /// refcount block shared, misaligned or with reserved bits): only a rebuild fixes that.
    var needsRebuild = false
    /// `check -r all`: gives a refcount block the table names past the end of the file
    /// a cluster of its own by extending the file to the given length (as QEMU does).
    var extendFile: ((UInt64) throws -> Void)?
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
            snapshotTableBytes += UInt64(sn.paddedSize)
        }
        if image.header.nbSnapshots > 0 { count(image.header.snapshotsOffset, snapshotTableBytes) }
        // The LUKS header's clusters.
        if case .luks(let o, let l)? = image.encryption { count(o, l) }
        // Refcount table.
        count(image.header.refcountTableOffset, UInt64(image.header.refcountTableClusters) * cs)
        // Bitmaps.
        if let e = image.bitmapsError {
            report("ERROR bitmaps: \(e.message); the bitmaps cannot be used")
            result.corruptions += 1
        }
        if reportCopied {
            for b in image.bitmaps where b.inUse {
                report("Bitmap '\(b.name)' is inconsistent (in use) and cannot be used")
                result.inconsistentBitmaps.append(b.name)
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
            if raw & ~RefcountReader.offsetMask != 0 {
                report("ERROR refcount table entry \(i) has reserved bits set")
                corruptRefcountStructure()
                continue
            }
            if !g.isAligned(off) {
                report("ERROR refcount block \(i) is not cluster aligned; refcount table entry corrupted")
                corruptRefcountStructure()
                continue
            }
            let cluster = off >> UInt64(g.clusterBits)
            if cluster >= UInt64(references.count) {
                blockOutsideImage(i, at: off)
                continue
            }
            if off != 0 {
                count(off, UInt64(g.clusterSize))
                let r = references[Int(cluster)]
                if r != 1 {
                    report("ERROR refcount block \(i) refcount=\(r)")
                    corruptRefcountStructure()
                }
            }
        }
    }

    private func corruptRefcountStructure() {
        result.corruptions += 1
        needsRebuild = true
    }

    /// The longest a repair makes the file for refcount blocks past its end: its length
    /// again, or 16 clusters, whichever is more. (QEMU 7.2 extends the file to wherever the
    /// table points, up to 2^56 bytes; a block further out than this is left out and the
    /// structure rebuilt, which needs only clusters near the end of the file.)
    var maxRepairedLength: UInt64 {
        fileLength + max(fileLength, 16 * UInt64(image.geometry.clusterSize))
    }

    /// Refcount block `i` at `offset`, past the end of the file: an error, or (`check -r
    /// all`) repaired as QEMU repairs it, by extending the file to hold it; when that
    /// cannot be done, the structure is rebuilt without it.
    func blockOutsideImage(_ i: Int, at offset: UInt64) {
        guard let extendFile else {
            report("ERROR refcount block \(i) is outside image")
            result.corruptions += 1
            return
        }
        report("Repairing refcount block \(i) is outside image")
        let cs = UInt64(image.geometry.clusterSize)
        let cluster = offset >> UInt64(image.geometry.clusterBits)
        do {
            guard offset <= UInt64(Int64.max) - cs else { throw QCow2Error.io(path: image.path, operation: "truncate", errno: EINVAL) }
            guard offset + cs <= maxRepairedLength else {
                throw QCow2Error.io(path: image.path, operation: "truncate", errno: EFBIG)
            }
            try extendFile(offset + cs)
        } catch {
            if case .io(_, _, let e) = error as? QCow2Error {
                report("ERROR could not resize image: \(errnoDescription(e))")
            } else {
                report("ERROR could not resize image: \((error as? QCow2Error)?.message ?? "\(error)")")
            }
            corruptRefcountStructure()
            return
        }
        references += repeatElement(0, count: Int(cluster) + 1 - references.count)
        references[Int(cluster)] += 1
        result.corruptionsFixed += 1
    }

    /// The clusters of the refcount structure in force (its table, and every block the
    /// table names, valid or not): a rebuild writes none of them.
    func refcountStructureClusters() -> Set<UInt64> {
        let cb = UInt64(image.geometry.clusterBits)
        var s = Set<UInt64>()
        let t = image.header.refcountTableOffset >> cb
        for k in 0..<UInt64(image.header.refcountTableClusters) { s.insert(t + k) }
        for raw in refcounts.table where raw & RefcountReader.offsetMask != 0 { s.insert((raw & RefcountReader.offsetMask) >> cb) }
        return s
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

    /// Entries whose COPIED flag disagrees with the refcount, in qemu-img's order: each L1 entry, then the entries of its table.
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
                wrongCopied.append(.l1(index: i, corrected: rc == 1 ? raw | L1Entry.copied : raw & ~L1Entry.copied, refcount: rc))
            }
            // The table's entries were compared with their refcounts by checkL2.
            for (table, j, corrected, rc) in wrongCopiedByL1[i] ?? [] {
                if reportCopied { report("ERROR OFLAG_COPIED data cluster: l2_entry=\(hex(corrected ^ L2Entry.copied)) refcount=\(rc)") }
                result.corruptions += 1
                wrongCopied.append(.l2(table: table, index: j, corrected: corrected, refcount: rc))
            }
        }
    }
}
