#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Options of a new image (qemu-img create -o ...), already validated by `validate()`.
public struct CreateOptions: Sendable, Equatable {
    public enum Preallocation: String, Sendable, CaseIterable { case off, metadata, falloc, full }

    public var format: ImageFormat = .qcow2
    /// Virtual size in bytes (rounded up to 512 when the image is written).
    public var size: UInt64 = 0
    public var clusterSize: Int = 65536
    /// 2 (compat 0.10) or 3 (compat 1.1).
    public var version: UInt32 = 3
    public var refcountBits: Int = 16
    public var lazyRefcounts = false
    public var extendedL2 = false
    public var compressionType: CompressionType = .zlib
    public var preallocation: Preallocation = .off
    public var backingFile: String?
    public var backingFormat: String?

    public init() {}

    /// QEMU's rules for combinations, for the image `path`; the message is qemu-img's.
    public func validate(path: String) throws(QCow2Error) {
        do { try check() } catch { throw .invalidArgument(path: path, detail: error.detail) }
    }

    /// QEMU's rules for combinations: the option at fault and qemu-img's message.
    func check() throws(FormatError) {
        if format == .raw {
            if backingFile != nil { throw FormatError("backing_file", "Backing file not supported for file format 'raw'") }
            if preallocation == .metadata { throw FormatError("preallocation", "Unsupported preallocation mode: metadata") }
            return
        }
        guard clusterSize >= 512, clusterSize <= 2 << 20, clusterSize & (clusterSize - 1) == 0 else {
            throw FormatError("cluster_size", "Cluster size must be a power of two between 512 and 2048k")
        }
        guard refcountBits >= 1, refcountBits <= 64, refcountBits & (refcountBits - 1) == 0 else {
            throw FormatError("refcount_bits", "Refcount width must be a power of two and may not exceed 64 bits")
        }
        if version < 3 {
            if refcountBits != 16 {
                throw FormatError("refcount_bits", "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)")
            }
            if extendedL2 {
                throw FormatError("extended_l2", "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)")
            }
            if compressionType != .zlib {
                throw FormatError("compression_type", "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)")
            }
            if lazyRefcounts {
                throw FormatError("lazy_refcounts", "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)")
            }
        }
        if extendedL2 && clusterSize < 16384 {
            throw FormatError("extended_l2", "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
        }
        if backingFormat != nil && backingFile == nil {
            throw FormatError("backing_fmt", "Backing format cannot be used without backing file")
        }
        if backingFile != nil && preallocation != .off && !extendedL2 {
            throw FormatError("preallocation", "Backing file and preallocation can only be used at the same time if extended_l2 is on")
        }
        let g = try geometry()
        if g.l1EntriesNeeded(size: roundedSize) > UInt64(Geometry.maxL1Bytes / 8) {
            throw FormatError("size", "The image size is too large for file format 'qcow2' (try using a larger cluster size)")
        }
    }

    var roundedSize: UInt64 { (size + 511) & ~UInt64(511) }

    func geometry() throws(FormatError) -> Geometry {
        try Geometry(clusterBits: clusterSize.trailingZeroBitCount, extendedL2: extendedL2,
                     refcountOrder: refcountBits.trailingZeroBitCount)
    }
}

/// Writes new images: the layout qemu-img 7.2 writes (header, refcount table,
/// first refcount block, L1 table), each step through the same allocator and
/// durable before the header points at it.
public enum ImageCreator {
    /// `filledThenSynced`: the caller fills the new file and makes it durable as a whole
    /// (convert and backup targets: `TargetCopy.finish` fsyncs them, and nothing uses
    /// them before), so its creation needs no barriers and no fsync of its own.
    public static func create(_ path: String, options o: CreateOptions, filledThenSynced: Bool = false) throws {
        do { try o.check() } catch { throw error.at(path) }
        switch o.format {
        case .raw: try createRaw(path, o, deferSync: filledThenSynced)
        case .qcow2: try createQCow2(path, o, deferSync: filledThenSynced)
        }
    }

    /// The new file at `path`, its barriers deferred to the caller's final fsync when asked.
    static func newFile(_ path: String, deferSync: Bool) throws -> BlockFile {
        let f = try BlockFile(creating: path)
        f.deferSync = deferSync
        return f
    }

    /// The last step of a creation: the new file durable, unless the caller's fsync does it.
    static func finishFile(_ f: BlockFile) throws {
        if !f.deferSync { try f.fullSync() }
    }

    static func createRaw(_ path: String, _ o: CreateOptions, deferSync: Bool) throws {
        let f = try newFile(path, deferSync: deferSync)
        try removingOnFailure(path, file: f) {
            let size = o.roundedSize
            // A block device (convert -O raw onto a disk) has its size already.
            var st = stat()
            let regular = fstat(f.fd, &st) != 0 || (st.st_mode & S_IFMT) == S_IFREG
            if regular { try f.truncate(to: size) }
            // qemu-img writes the first 4 KiB of a new raw image (its alignment probe);
            // doing the same keeps `map` output identical.
            if size > 0 { try writeZeros(f, at: 0, length: min(size, 4096)) }
            switch o.preallocation {
            case .falloc: _ = f.preallocate(at: 0, length: size)
            case .full: try writeZeros(f, at: 0, length: size)
            default: break
            }
            try finishFile(f)
        }
    }

    /// Runs `body` on a file this creator has just created (or truncated); when it fails,
    /// the half-made file is removed (a failed create leaves no image that looks usable).
    /// Only a regular file is removed: a device node or other special file stays.
    static func removingOnFailure(_ path: String, file: BlockFile, _ body: () throws -> Void) throws {
        do { try body() } catch {
            var st = stat()
            if fstat(file.fd, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG { _ = Sys.unlink(path) }
            throw error
        }
    }

    public static func writeZeros(_ f: BlockFile, at offset: UInt64, length: UInt64) throws {
        let chunk = [UInt8](repeating: 0, count: 1 << 20)
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(chunk.count), length - done))
            try chunk.withUnsafeBytes { try f.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: offset + done) }
            done += UInt64(n)
        }
    }

    /// The header cluster: header, extensions (backing format, feature names), end marker, backing name.
    static func headerCluster(_ o: CreateOptions, g: Geometry) -> [UInt8] {
        let cs = UInt64(g.clusterSize)
        var exts: [HeaderExtension] = []
        if let f = o.backingFormat { exts.append(.backingFormat(f)) }
        if o.version >= 3 && FeatureName.tableWritten(clusterSize: g.clusterSize) { exts.append(.featureNameTable(FeatureName.qemuDefault)) }
        var incompatible: UInt64 = 0
        if o.compressionType != .zlib { incompatible |= Features.compressionType }
        if o.extendedL2 { incompatible |= Features.extendedL2 }
        var h = try! Header(parsing: ByteReader(Header.blankHeader(version: o.version)))
        h.clusterBits = UInt32(g.clusterBits)
        h.size = 0  // set once the L1 table exists
        h.refcountTableOffset = cs
        h.refcountTableClusters = 1
        if o.version >= 3 {
            h.incompatibleFeatures = incompatible
            h.compatibleFeatures = o.lazyRefcounts ? Features.lazyRefcounts : 0
            h.refcountOrder = UInt32(g.refcountOrder)
            h.headerLength = 112
            h.compressionType = o.compressionType.rawValue
        }
        func layout(_ exts: [HeaderExtension]) -> [UInt8] {
            var bytes: [UInt8] = []
            h.serialize(into: &bytes)
            HeaderExtension.serialize(exts, into: &bytes)
            if let b = o.backingFile {
                let name = PathCodec.encode(b)
                h.backingFileOffset = UInt64(bytes.count)
                h.backingFileSize = UInt32(name.count)
                HeaderField.patch(&bytes, [.backingFile], of: h)
                bytes += name
            }
            return bytes
        }
        var bytes = layout(exts)
        if bytes.count > g.clusterSize {
            // As QEMU: the feature name table is left out when it does not fit (small
            // clusters with a backing file); what still does not fit is refused by the caller.
            bytes = layout(exts.filter { if case .featureNameTable = $0 { return false } else { return true } })
        }
        bytes += [UInt8](repeating: 0, count: max(0, g.clusterSize - bytes.count))
        return bytes
    }

    static func createQCow2(_ path: String, _ o: CreateOptions, deferSync: Bool) throws {
        let g: Geometry
        do { g = try o.geometry() } catch { throw error.at(path) }
        let cs = UInt64(g.clusterSize)
        let header = headerCluster(o, g: g)
        guard header.count == g.clusterSize else {
            throw QCow2Error.invalidArgument(path: path, detail: "the header and backing file name do not fit in one cluster")
        }
        // 1. Header (no L1 yet), refcount table, refcount block 0 describing clusters 0..2.
        let f = try newFile(path, deferSync: deferSync)
        try removingOnFailure(path, file: f) {
            var table = [UInt8](repeating: 0, count: g.clusterSize)
            table.withUnsafeMutableBytes { $0.storeBytes(of: (2 * cs).bigEndian, toByteOffset: 0, as: UInt64.self) }
            var block = [UInt8](repeating: 0, count: g.clusterSize)
            for c in 0..<3 { Allocator.store(&block, c, 1, order: g.refcountOrder) }
            try f.write(header, at: 0)
            try f.write(table, at: cs)
            try f.write(block, at: 2 * cs)
            try f.sync()

            // 2. The L1 table, allocated and published in the header, then the size.
            let image = try QCow2Image(path: path, file: f)
            try image.enableWriting()
            let tx = try MetadataTransaction(image)
            let l1Entries = g.l1EntriesNeeded(size: o.roundedSize)
            if l1Entries > 0 {
                let clusters = Int(g.clusters(forBytes: l1Entries * 8))
                let l1Offset = try tx.allocate(clusters)
                try tx.commitRefcounts()
                try tx.writeNew([UInt8](repeating: 0, count: Int(l1Entries) * 8), at: l1Offset)
                var h = image.header
                h.l1Size = UInt32(l1Entries)
                h.l1TableOffset = l1Offset
                try tx.publishHeader(.l1Table, of: h)
                image.header.l1Size = UInt32(l1Entries)
                image.header.l1TableOffset = l1Offset
                image.l1Table = [UInt64](repeating: 0, count: Int(l1Entries))
            }
            var h = image.header
            h.size = o.roundedSize
            try tx.publishHeader(.size, of: h)
            image.header.size = o.roundedSize
            // 3. Preallocation: L2 tables and data clusters.
            if o.preallocation != .off {
                try image.preallocate(o.preallocation)
            }
            try finishFile(f)
        }
    }
}

extension QCow2Image {
    /// Allocates L2 tables and data clusters for every unallocated cluster of
    /// [from, virtual size) (each new L2 table followed by its data clusters); with
    /// falloc/full the data clusters are also allocated on disk or written with zeros.
    /// Same order as writes: refcounts, data and table, then the L1/L2 entry.
    func preallocate(_ mode: CreateOptions.Preallocation, from: UInt64 = 0) throws {
        guard mode != .off else { return }
        let g = geometry
        let cs = UInt64(g.clusterSize)
        let alloc = try requireAllocator()
        let size = virtualSize
        var pos = from & ~(cs - 1)
        while pos < size {
            let l1i = g.l1Index(pos)
            let rangeEnd = min(size, (pos | (g.bytesPerL2 - 1)) &+ 1)
            let existing = L1Entry(l1Table[l1i])
            var table: [UInt8]
            let tableOffset: UInt64?
            if existing.l2Offset != 0 && existing.isCopied {
                table = try map.l2Table(at: existing.l2Offset, l1Index: l1i)
                tableOffset = existing.l2Offset
            } else if existing.l2Offset == 0 {
                table = [UInt8](repeating: 0, count: g.clusterSize)
                tableOffset = nil
            } else {
                pos = rangeEnd  // shared with a snapshot: leave it
                continue
            }
            let indices = (g.l2Index(pos)...g.l2Index(rangeEnd - 1)).filter { map.l2Entry(table, $0) == L2Entry(0) }
            pos = rangeEnd
            guard !indices.isEmpty else { continue }
            var tx = try MetadataTransaction(self)
            let newTable = tableOffset == nil ? try tx.allocate(1) : 0
            let data = try tx.allocate(indices.count)
            try tx.commitRefcounts()
            let bytes = UInt64(indices.count) * cs
            switch mode {
            case .falloc: _ = file.preallocate(at: data, length: bytes)
            case .full: try ImageCreator.writeZeros(file, at: data, length: bytes)
            default: if try file.size() < data + bytes { try file.truncate(to: data + bytes) }
            }
            for (k, i) in indices.enumerated() { map.setL2Entry(&table, i, L2Entry((data + UInt64(k) * cs) | L2Entry.copied)) }
            if let t = tableOffset {
                try tx.publishL2(table, l1Index: l1i, to: .existing(offset: t, changed: 0..<g.l2Entries), afterData: true)
            } else {
                try tx.publishL2(table, l1Index: l1i, to: .new(offset: newTable, replaces: nil), afterData: true)
            }
        }
        fileSize = try file.size()
        // Refcount tables replaced while growing are freed only now.
        try alloc.commitFrees()
    }
}
