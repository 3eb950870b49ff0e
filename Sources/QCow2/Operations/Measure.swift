/// `qemu-img measure`: how large a new image would be, for a virtual size (`--size`) or for
/// an existing image converted into it (its whole backing chain, flattened as convert does).
///
/// Two figures, as qemu-img 7.2 reports them:
/// - fully allocated: every data cluster allocated, plus the qcow2 metadata that such an
///   image needs (header cluster, L1 and L2 tables, refcount table and blocks);
/// - required: the same metadata, but only the data clusters the source really holds
///   (all of them with falloc/full preallocation, or when the new image gets a backing file).
/// A qcow2 target of compat 1.1 measured from a qcow2 v3 source also reports the space its
/// persistent bitmaps would take ("bitmaps").
public struct MeasureOptions: Sendable, Equatable {
    /// The format of the image to be created.
    public var format: ImageFormat = .raw
    /// The virtual size asked for (`--size`, or `-o size=`). With a source image the source's
    /// size is measured instead, but the qcow2 L1 limit is still checked against this one.
    public var size: UInt64 = 0
    // qcow2 options as given (nil: not given); `validated()` checks them in qemu-img's order.
    public var clusterSize: UInt64?
    public var extendedL2 = false
    /// `compat`: "0.10" or "1.1" (measure does not take v2/v3).
    public var compat: String?
    public var refcountBits: UInt64?
    /// `preallocation`: off, metadata, falloc or full (a raw target ignores it).
    public var preallocation: String?
    /// `backing_file` given: the new image would sit on a backing file.
    public var backingFile = false
    /// `encrypt.format` and `encrypt.key-secret`.
    public var encryptFormat: String?
    public var encryptKeySecret: String?

    public init() {}

    /// The qcow2 geometry and modes these options describe.
    public struct QCow2Target: Sendable, Equatable {
        public var geometry: Geometry
        public var version: UInt32
        public var preallocation: CreateOptions.Preallocation
    }

    /// Checks the qcow2 options in the order qemu-img does, with its messages.
    func validated() throws(FormatError) -> QCow2Target {
        let cs = clusterSize ?? 65536
        guard cs >= 512, cs <= 2 << 20, cs & (cs - 1) == 0 else {
            throw FormatError("cluster_size", "Cluster size must be a power of two between 512 and 2048k")
        }
        if extendedL2 && cs < 16384 {
            throw FormatError("extended_l2", "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
        }
        let version: UInt32
        switch compat {
        case nil, "1.1": version = 3
        case "0.10": version = 2
        case let c?: throw FormatError("compat", "Invalid compatibility level: '\(c)'")
        }
        let bits = refcountBits ?? 16
        guard bits >= 1, bits <= 64, bits & (bits - 1) == 0 else {
            throw FormatError("refcount_bits", "Refcount width must be a power of two and may not exceed 64 bits")
        }
        if version < 3 && bits != 16 {
            throw FormatError("refcount_bits", "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
        }
        var prealloc = CreateOptions.Preallocation.off
        if let p = preallocation {
            guard let mode = CreateOptions.Preallocation(rawValue: p) else {
                throw FormatError("preallocation", "invalid parameter value: \(p)")
            }
            prealloc = mode
        }
        // qimg takes no --object, so a LUKS secret can never be found (as in qemu-img without one).
        if encryptFormat == "luks" {
            guard let secret = encryptKeySecret else {
                throw FormatError("encrypt.key-secret", "Parameter 'encrypt.key-secret' is required for cipher")
            }
            throw FormatError("encrypt.key-secret", "No secret with id '\(secret)'")
        }
        let g = try Geometry(clusterBits: cs.trailingZeroBitCount, extendedL2: extendedL2,
                             refcountOrder: bits.trailingZeroBitCount)
        // The L1 limit, on the size asked for (not the source's).
        let tooLarge = FormatError("size", "The image size is too large (try using a larger cluster size)")
        guard let rounded = MeasureOperation.roundUp(size, cs) else { throw tooLarge }
        let l2Tables = MeasureOperation.ceilDiv(rounded / cs, UInt64(g.l2Entries))
        guard l2Tables <= UInt64(Geometry.maxL1Bytes / 8) else { throw tooLarge }
        return QCow2Target(geometry: g, version: version, preallocation: prealloc)
    }
}

public struct MeasureResult: Equatable, Sendable {
    public var required: UInt64
    public var fullyAllocated: UInt64
    /// Bytes for the source's persistent bitmaps; nil when not reported (raw target or
    /// source, compat 0.10 target, version 2 source, no source).
    public var bitmaps: UInt64?

    public init(required: UInt64, fullyAllocated: UInt64, bitmaps: UInt64? = nil) {
        self.required = required
        self.fullyAllocated = fullyAllocated
        self.bitmaps = bitmaps
    }
}

public enum MeasureOperation {
    /// Measures a new image of `options` (from `source`, or from `options.size` without one).
    public static func run(_ source: (any DiskImage)?, options o: MeasureOptions) throws -> MeasureResult {
        switch o.format {
        case .raw:
            // A raw file is as large as its disk, allocated or not.
            let size: UInt64
            if let source { size = source.virtualSize } else {
                guard let s = roundUp(o.size, 512) else { throw tooLarge }
                size = s
            }
            return MeasureResult(required: size, fullyAllocated: size)
        case .qcow2:
            let t: MeasureOptions.QCow2Target
            do { t = try o.validated() } catch { throw QCow2Error.invalidArgument(path: "", detail: error.detail) }
            let cs = UInt64(t.geometry.clusterSize)
            guard let virtualSize = roundUp(source?.virtualSize ?? o.size, cs) else { throw tooLarge }
            var data: UInt64 = 0
            if let source {
                // With a backing file nothing is known of what it would share: count everything.
                data = o.backingFile ? virtualSize : try allocatedBytes(source, clusterSize: cs)
            }
            if t.preallocation == .falloc || t.preallocation == .full { data = virtualSize }
            guard let full = qcow2FullyAllocated(virtualSize: virtualSize, geometry: t.geometry) else { throw tooLarge }
            var result = MeasureResult(required: full - virtualSize + data, fullyAllocated: full)
            if t.version >= 3, let q = source as? QCow2Image, q.header.version >= 3 {
                guard let b = bitmapsBytes(q.bitmaps, diskSize: q.virtualSize, clusterSize: cs) else { throw tooLarge }
                result.bitmaps = b
            }
            return result
        }
    }

    static let tooLarge = QCow2Error.invalidArgument(path: "", detail: "The image size is too large to be measured")

    // MARK: - The pure computations

    /// File size of a qcow2 image of `virtualSize` (a multiple of the cluster size) with every
    /// cluster allocated: header cluster, L2 tables, L1 table, refcount structures, data.
    /// nil on overflow.
    public static func qcow2FullyAllocated(virtualSize: UInt64, geometry g: Geometry) -> UInt64? {
        let cs = UInt64(g.clusterSize)
        guard let data = roundUp(virtualSize, cs) else { return nil }
        // L2 entries come in whole tables; the L1 table in whole clusters.
        let l2Entries = ceilDiv(data / cs, UInt64(g.l2Entries)) * UInt64(g.l2Entries)
        let l2Bytes = l2Entries.multipliedReportingOverflow(by: UInt64(g.l2EntrySize))
        guard !l2Bytes.overflow else { return nil }
        let l1Entries = ceilDiv(l2Bytes.partialValue / cs, cs / 8) * (cs / 8)
        let metadata = [cs, l2Bytes.partialValue, l1Entries * 8]
        guard let meta = sum(metadata), let covered = sum([meta, data]),
              let refcounts = refcountMetadataBytes(clusters: covered / cs, geometry: g) else { return nil }
        return sum([meta, refcounts, data])
    }

    /// Bytes of refcount blocks and refcount table that describe `clusters` clusters plus
    /// themselves (the smallest blocks/table pair that covers everything, table included).
    public static func refcountMetadataBytes(clusters: UInt64, geometry g: Geometry) -> UInt64? {
        let perBlock = UInt64(1) << UInt64(g.refblockBits)
        let perTableCluster = UInt64(g.clusterSize / 8)
        var blocks: UInt64 = 0
        var table: UInt64 = 0
        while true {
            guard let all = sum([clusters, blocks, table]) else { return nil }
            let b = ceilDiv(all, perBlock)
            let t = ceilDiv(b, perTableCluster)
            if b == blocks && t == table { break }
            blocks = b
            table = t
        }
        let bytes = (blocks + table).multipliedReportingOverflow(by: UInt64(g.clusterSize))
        return bytes.overflow ? nil : bytes.partialValue
    }

    /// Space for `bitmaps` in a qcow2 image of `clusterSize`: each bitmap's data clusters
    /// (all assumed allocated) and its bitmap table, then the bitmap directory.
    public static func bitmapsBytes(_ bitmaps: [BitmapDirectoryEntry], diskSize: UInt64, clusterSize: UInt64) -> UInt64? {
        var total: UInt64 = 0
        var directory: UInt64 = 0
        for b in bitmaps {
            let clusters = BitmapDirectoryEntry.tableSize(diskSize: diskSize, granularityBits: Int(b.granularityBits),
                                                          clusterSize: Int(clusterSize))
            let dataBytes = clusters.multipliedReportingOverflow(by: clusterSize)
            let tableBytes = clusters.multipliedReportingOverflow(by: 8)
            guard !dataBytes.overflow, !tableBytes.overflow, let table = roundUp(tableBytes.partialValue, clusterSize),
                  let t = sum([total, dataBytes.partialValue, table]) else { return nil }
            total = t
            // A directory entry: 24 bytes and the name, padded to 8.
            directory += (24 + UInt64(b.name.utf8.count) + 7) & ~7
        }
        guard let dir = roundUp(directory, clusterSize) else { return nil }
        return sum([total, dir])
    }

    /// Bytes of whole clusters (of `clusterSize`) holding data somewhere in `image`'s chain:
    /// a cluster counts when any byte of it has data that does not read as zeros.
    public static func allocatedBytes(_ image: any DiskImage, clusterSize cs: UInt64) throws -> UInt64 {
        var total: UInt64 = 0
        var countedEnd: UInt64 = 0
        try MapOperation.run(image) { e in
            guard e.data && !e.zero, e.length > 0 else { return }
            let first = max(e.start / cs * cs, countedEnd)
            guard let last = roundUp(e.start + e.length, cs), last > first else { return }
            total += last - first
            countedEnd = last
        }
        return total
    }

    static func ceilDiv(_ a: UInt64, _ b: UInt64) -> UInt64 { a / b + (a % b != 0 ? 1 : 0) }

    /// `v` rounded up to a multiple of `unit` (a power of two); nil on overflow.
    static func roundUp(_ v: UInt64, _ unit: UInt64) -> UInt64? {
        let r = v.addingReportingOverflow(unit - 1)
        return r.overflow ? nil : r.partialValue & ~(unit - 1)
    }

    static func sum(_ values: [UInt64]) -> UInt64? {
        var total: UInt64 = 0
        for v in values {
            let r = total.addingReportingOverflow(v)
            if r.overflow { return nil }
            total = r.partialValue
        }
        return total
    }
}

extension MeasureOperation {
    /// QEMU 7.2's drivers that create images but cannot measure them.
    static let createOnlyDrivers: Set<String> = ["file", "host_device", "host_cdrom", "nbd", "nvme", "parallels",
                                                 "qcow", "qed", "vdi", "vhdx", "vmdk", "vpc"]
    /// QEMU 7.2's drivers that cannot create images at all.
    static let readOnlyDrivers: Set<String> = ["blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress",
                                               "copy-before-write", "copy-on-read", "dmg", "null-aio", "null-co",
                                               "preallocate", "quorum", "replication", "snapshot-access", "throttle", "vvfat"]

    /// qemu-img's error for `-O NAME` when NAME is not qcow2 or raw, by QEMU's driver names.
    /// `keySecret`: the `key-secret` option given (luks measures need that secret, and qimg
    /// has no `--object` to define it).
    public static func unsupportedFormatMessage(_ name: String, keySecret: String?) -> String {
        if name == "luks" {
            return keySecret.map { "No secret with id '\($0)'" } ?? "Parameter 'key-secret' is required for cipher"
        }
        if createOnlyDrivers.contains(name) { return "Block driver '\(name)' does not support size measurement" }
        if readOnlyDrivers.contains(name) { return "Format driver '\(name)' does not support image creation" }
        return "Unknown file format '\(name)'"
    }
}
