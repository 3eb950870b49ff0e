/// In-place changes of image options (qemu-img amend): lazy refcounts, and the
/// compatibility level where no information would be lost.
extension QCow2Image {
    /// Turns lazy refcounts on or off (v3 only).
    public func setLazyRefcounts(_ on: Bool) throws {
        _ = try requireAllocator()
        guard header.version >= 3 else {
            if !on { return }
            throw QCow2Error.unsupported(path: path, detail: "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
        }
        let bits = on ? header.compatibleFeatures | Features.lazyRefcounts : header.compatibleFeatures & ~Features.lazyRefcounts
        guard bits != header.compatibleFeatures else { return }
        try clearUnknownAutoclearBits()
        header.compatibleFeatures = bits
        try writeFeatureBits(compatible: true)
    }

    /// Changes the compatibility level: 2 (0.10) or 3 (1.1). A downgrade is refused
    /// whenever version 2 cannot express the image exactly (unlike qemu-img, which
    /// silently leaks persistent bitmaps).
    public func setVersion(_ version: UInt32) throws {
        _ = try requireAllocator()
        guard version != header.version else { return }
        var h = header
        var exts = extensions
        if version == 3 {
            h.version = 3
            h.headerLength = 112
            h.refcountOrder = 4
            h.incompatibleFeatures = 0
            h.compatibleFeatures = 0
            h.autoclearFeatures = 0
            h.compressionType = 0
            if !exts.contains(where: { if case .featureNameTable = $0 { return true } else { return false } }) {
                exts.append(.featureNameTable(FeatureName.qemuDefault))
            }
        } else {
            if let refusal = try downgradeRefusal(finalSize: virtualSize) { throw refusal }
            h.version = 2
            h.incompatibleFeatures = 0
            h.compatibleFeatures = 0
            h.autoclearFeatures = 0
            h.refcountOrder = 4
            h.compressionType = 0
            exts.removeAll { if case .featureNameTable = $0 { return true } else { return false } }
        }
        try clearUnknownAutoclearBits()
        try writeHeaderCluster(h, extensions: exts)
    }

    /// Why a downgrade to version 2 would be refused once the disk is `finalSize` bytes
    /// (amend resizes before it downgrades); nil when it can be done. Reads, never writes.
    public func downgradeRefusal(finalSize: UInt64) throws -> QCow2Error? {
        func no(_ d: String) -> QCow2Error { .unsupported(path: path, detail: d) }
        if header.hasExtendedL2 { return no("Cannot downgrade an image with incompatible features 0x10 set (extended L2 entries)") }
        if compressionType != .zlib { return no("Cannot downgrade an image with the zstd compression type") }
        if bitmapsExtension != nil {
            return no("Cannot downgrade an image with persistent bitmaps: version 2 cannot store them (remove them first)")
        }
        if geometry.refcountBits != 16 { return no("compat=0.10 requires refcount_bits=16") }
        // Version 2 snapshots have no disk size of their own (they take the image's)
        // and a 32-bit VM state size: others could not be applied any more.
        if snapshots.contains(where: { ($0.diskSize ?? virtualSize) != finalSize || $0.vmStateSize > UInt64(UInt32.max) }) {
            return no("Internal snapshots prevent downgrade of image")
        }
        if header.isDirty { return no("Cannot downgrade an image that was not closed cleanly") }
        if try hasZeroClusters() {
            return no("Cannot downgrade an image with zero clusters (version 2 has no zero flag); write the zeros as data first")
        }
        return nil
    }

    /// Whether any L2 entry of the active table or a snapshot uses the zero flag.
    func hasZeroClusters() throws -> Bool {
        let g = geometry
        var l1s: [[UInt64]] = [l1Table]
        for sn in snapshots {
            var t: [UInt64] = []
            let raw = try file.read(count: Int(sn.l1Size) * 8, at: sn.l1TableOffset)
            raw.withUnsafeBytes { decodeBigEndianU64($0, into: &t) }
            l1s.append(t)
        }
        for l1 in l1s {
            for (i, e) in l1.enumerated() where L1Entry(e).l2Offset != 0 {
                let table = try l2Table(at: L1Entry(e).l2Offset, l1Index: i)
                for j in 0..<g.l2Entries {
                    let x = l2Entry(table, j)
                    if !x.isCompressed && x.raw & L2Entry.zeroFlag != 0 { return true }
                }
            }
        }
        return false
    }

    /// Rewrites cluster 0 (header, extensions, end marker, backing file name right after it).
    func writeHeaderCluster(_ h: Header, extensions exts: [HeaderExtension]) throws {
        try writeHeaderCluster(h, extensions: exts, backingName: backingFileName)
    }

    /// Rewrites cluster 0 with `backingName` (nil: no backing file) placed right after the
    /// end marker, as QEMU lays it out, in one write, then syncs.
    func writeHeaderCluster(_ h: Header, extensions exts: [HeaderExtension], backingName: String?) throws {
        let (bytes, h) = try headerCluster(h, extensions: exts, backingName: backingName)
        try file.write(bytes, at: 0)
        try file.sync()
        header = h
        extensions = exts
        backingFileName = backingName
    }

    /// Cluster 0 as `writeHeaderCluster` lays it out, and the header with its backing
    /// file fields set; throws when it does not fit in one cluster.
    func headerCluster(_ h: Header, extensions exts: [HeaderExtension], backingName: String?) throws -> ([UInt8], Header) {
        var h = h
        h.backingFileOffset = 0
        h.backingFileSize = 0
        var bytes: [UInt8] = []
        h.serialize(into: &bytes)
        HeaderExtension.serialize(exts, into: &bytes)
        if let b = backingName {
            let name = PathCodec.encode(b)
            h.backingFileOffset = UInt64(bytes.count)
            h.backingFileSize = UInt32(name.count)
            bytes += name
            var again: [UInt8] = []
            h.serialize(into: &again)
            bytes.replaceSubrange(0..<again.count, with: again)
        }
        guard bytes.count <= geometry.clusterSize else {
            throw QCow2Error.unsupported(path: path, detail: "the header does not fit in one cluster")
        }
        bytes += [UInt8](repeating: 0, count: geometry.clusterSize - bytes.count)
        return (bytes, h)
    }
}
