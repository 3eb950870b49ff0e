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
            if FeatureName.tableWritten(clusterSize: geometry.clusterSize),
               !exts.contains(where: { if case .featureNameTable = $0 { return true } else { return false } }) {
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
        _ = try headers.layout(h, extensions: exts, backingName: backingFileName)  // fits, before any write
        try clearUnknownAutoclearBits()
        if version == 2 { try expandZeroClusters() }
        try MetadataTransaction(self).rewriteHeaderCluster(h, extensions: exts, backingName: backingFileName)
    }

    /// Why a downgrade to version 2 would be refused once the disk is `finalSize` bytes
    /// with refcounts `refcountBits` wide (amend changes them first); nil when it can be
    /// done. Reads, never writes.
    public func downgradeRefusal(finalSize: UInt64, refcountBits: Int? = nil) throws -> QCow2Error? {
        func no(_ d: String) -> QCow2Error { .unsupported(path: path, detail: d) }
        if header.hasExtendedL2 { return no("Cannot downgrade an image with incompatible features 0x10 set (extended L2 entries)") }
        if compressionType != .zlib { return no("Cannot downgrade an image with the zstd compression type") }
        if bitmapsExtension != nil {
            return no("Cannot downgrade an image with persistent bitmaps: version 2 cannot store them (remove them first)")
        }
        if (refcountBits ?? geometry.refcountBits) != 16 { return no("compat=0.10 requires refcount_bits=16") }
        // Version 2 snapshots have no disk size of their own (they take the image's)
        // and a 32-bit VM state size: others could not be applied any more.
        if snapshots.contains(where: { ($0.diskSize ?? virtualSize) != finalSize || $0.vmStateSize > UInt64(UInt32.max) }) {
            return no("Internal snapshots prevent downgrade of image")
        }
        if header.isDirty { return no("Cannot downgrade an image that was not closed cleanly") }
        return nil
    }
}
