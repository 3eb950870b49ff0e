/// A read-write session: turning writing on (locks are the opener's), what happens once
/// before the first change, the feature bits a session changes, and the corrupt mark a
/// writer sets when it finds metadata it cannot trust.
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

    func requireAllocator() throws -> Allocator {
        guard let a = allocator else {
            throw QCow2Error.invalidArgument(path: path, detail: "the image is open read-only")
        }
        return a
    }

    /// Writes the feature-bit fields of the header as they are in `header` (one 8-byte
    /// write each, then sync).
    func writeFeatureBits(incompatible: Bool = false, compatible: Bool = false, autoclear: Bool = false) throws {
        for (on, field) in [(incompatible, HeaderField.incompatibleFeatures), (compatible, .compatibleFeatures),
                            (autoclear, .autoclearFeatures)] where on {
            try MetadataTransaction.publishHeader(field, of: header, in: self)
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
}
