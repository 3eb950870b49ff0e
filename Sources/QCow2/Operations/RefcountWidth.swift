/// `amend -o refcount_bits=N`: the refcount structure replaced by one of another width,
/// built from the references a check counts (so leaks are dropped), written into free
/// clusters, and switched in with one header write (`publishRefcountWidth`). The old
/// structure is not counted by the new one: its clusters are free once the header points
/// away from it.
extension QCow2Image {
    /// Why refcounts `bits` wide cannot be used with compatibility level `version`
    /// (a width that is not a power of two up to 64, or not 16 on version 2); nil if they can.
    public static func refcountWidthRefusal(_ bits: Int, version: UInt32, path: String) -> QCow2Error? {
        guard bits > 0, bits <= 64, bits & (bits - 1) == 0 else {
            return .invalidArgument(path: path, detail: "Refcount width must be a power of two and may not exceed 64 bits")
        }
        guard version >= 3 || bits == 16 else {
            return .unsupported(path: path, detail: "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
        }
        return nil
    }

    /// The new structure for refcounts `bits` wide, laid out; reads only. Throws what
    /// would refuse the change: an image whose refcounts a check finds wrong (beyond
    /// leaks), a refcount the new width cannot hold.
    func refcountWidthLayout(bits: Int, version: UInt32) throws -> RefcountRebuild {
        if let refusal = Self.refcountWidthRefusal(bits, version: version, path: path) { throw refusal }
        let check = try CheckOperation(self, report: { _ in })
        check.reportCopied = false
        let found = try check.run()
        guard found.corruptions == 0 && found.checkErrors == 0 else {
            throw QCow2Error.needsRepair(path: path, detail: "the image has errors; repair it before changing the refcount width")
        }
        let old = check.refcountStructureClusters()
        var counts = check.references
        for c in old where c < UInt64(counts.count) && counts[Int(c)] > 0 { counts[Int(c)] -= 1 }
        if bits < 16, let bad = counts.firstIndex(where: { Int($0) >= 1 << bits }) {
            let offset = String(UInt64(bad) << UInt64(geometry.clusterBits), radix: 16)
            throw QCow2Error.unsupported(path: path, detail: "Cannot decrease refcount entry width to \(bits) bits: Cluster at offset 0x\(offset) has a refcount of \(counts[bad])")
        }
        let order = bits.trailingZeroBitCount
        let g: Geometry
        do {
            g = try Geometry(clusterBits: geometry.clusterBits, extendedL2: header.hasExtendedL2, refcountOrder: order)
        } catch { throw QCow2Error.malformed(path: path, field: error.field, detail: error.detail) }
        var layout = RefcountRebuild(counted: counts, geometry: g, oldStructure: old)
        try layout.layOut(path: path)
        return layout
    }

    /// Throws what `changeRefcountWidth(bits:)` would refuse once the image is at
    /// compatibility level `version` (an upgrade in the same amend comes first); writes nothing.
    public func checkRefcountWidthChange(bits: Int, version: UInt32) throws {
        _ = try requireAllocator()
        guard bits != geometry.refcountBits else { return }
        _ = try refcountWidthLayout(bits: bits, version: version)
    }

    /// Switches the image to refcounts `bits` wide and returns the image opened again
    /// for writing over the same file (and locks); this one must not be used afterwards.
    /// Everything that refuses it is found before the first write.
    public func changeRefcountWidth(bits: Int) throws -> QCow2Image {
        _ = try requireAllocator()
        guard bits != geometry.refcountBits else { return self }
        let layout = try refcountWidthLayout(bits: bits, version: header.version)
        try clearUnknownAutoclearBits()
        try MetadataTransaction(self).publishRefcountWidth(layout)
        let reopened = try QCow2Image(path: path, file: file)
        reopened.dataFile = dataFile
        try reopened.enableWriting()
        return reopened
    }
}
