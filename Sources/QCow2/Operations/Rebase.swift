/// What `qemu-img rebase` does.
public struct RebaseOptions: Sendable {
    /// Format of the image to rebase (probed when nil).
    public var format: ImageFormat?
    /// The new backing file name, stored as given (relative names are relative to the
    /// image); nil or empty: no backing file.
    public var backing: String?
    /// `-F`: the format of the new backing file (required with a backing file).
    public var backingFormat: ImageFormat?
    /// `-u`: only change the header; the guest content may change.
    public var unsafeMode = false
    public var cacheBytes = QCow2Image.defaultCacheBytes

    public init() {}
}

/// `qemu-img rebase`: in safe mode, every range the image does not allocate itself
/// and where the old and the new backing chains differ is first copied into the image
/// (the old content, at 512-byte granularity as qemu-img compares), so the guest view
/// does not change; then the header names the new backing file. In unsafe mode only
/// the header changes.
public enum RebaseOperation {
    static let chunkSize = CompareOperation.chunkSize

    public static func run(_ path: String, options: RebaseOptions,
                           progress: (UInt64, UInt64) -> Void = { _, _ in }) throws {
        let newName = options.backing.flatMap { $0.isEmpty ? nil : $0 }
        func cannotChange(_ why: String) -> QCow2Error {
            .unsupported(path: "", detail: "Could not change the backing file to '\(options.backing ?? "")': \(why)")
        }
        var opener = ImageOpener()
        opener.writable = true
        opener.openBacking = !options.unsafeMode
        opener.cacheBytes = options.cacheBytes
        let opened = try opener.open(path, format: options.format)
        guard let image = opened as? QCow2Image else { throw cannotChange("Operation not supported") }
        if newName != nil && options.backingFormat == nil { throw cannotChange("backing format must be specified") }
        if let n = newName, PathCodec.encode(n).count > 1023 { throw cannotChange("File name too long") }
        try checkHeaderFits(image, name: newName, format: newName == nil ? nil : options.backingFormat?.rawValue)

        if !options.unsafeMode {
            var newBacking: (any DiskImage)?
            if let n = newName {
                var o = ImageOpener()
                o.cacheBytes = options.cacheBytes
                do {
                    let loc = try BackingName.locate(n, format: options.backingFormat, relativeTo: path)
                    newBacking = try o.open(loc.path, format: loc.format)
                } catch let e as QCow2Error {
                    throw QCow2Error.backing(path: "", detail: "Could not open new backing file '\(n)': \(e.description)")
                }
            }
            try copyDifferences(image, old: image.backing, new: newBacking, progress: progress)
            // Everything written is durable (and bitmaps stored) before the header changes.
            try image.close()
        }
        try image.rewriteBacking(name: newName, format: newName == nil ? nil : options.backingFormat?.rawValue)
        progress(1, 1)
    }

    /// Copies the old backing content into `image` wherever the image does not allocate
    /// the range itself and the old and new backing content differ.
    static func copyDifferences(_ image: QCow2Image, old: (any DiskImage)?, new: (any DiskImage)?,
                                progress: (UInt64, UInt64) -> Void) throws {
        let size = image.virtualSize
        let oldSize = old?.virtualSize ?? 0
        let newSize = new?.virtualSize ?? 0
        var bufOld = [UInt8](repeating: 0, count: chunkSize)
        var bufNew = [UInt8](repeating: 0, count: chunkSize)
        let oldStatus = old.map { ChainStatus($0) }
        let newStatus = new.map { ChainStatus($0) }
        var offset: UInt64 = 0
        progress(0, size)
        while offset < size {
            let ext = try image.layerExtent(at: offset, maxLength: min(UInt64(chunkSize), size - offset))
            var n = ext.length
            if case .unallocated = ext.descriptor {} else {
                offset += n
                progress(offset, size)
                continue
            }
            let oldIsZero = old == nil || offset >= oldSize
            // Where both backing chains report zeros there is nothing to compare.
            let (oldZero, oldRun) = try zeroRun(oldStatus, offset, n)
            let (newZero, newRun) = try zeroRun(newStatus, offset, n)
            if oldZero && newZero {
                offset += min(oldRun, newRun)
                progress(offset, size)
                continue
            }
            if oldIsZero {
                zero(&bufOld, Int(n))
            } else {
                n = min(n, oldSize - offset)
                try fill(&bufOld, from: old!, offset, Int(n))
            }
            if let new, offset < newSize {
                n = min(n, newSize - offset)
                try fill(&bufNew, from: new, offset, Int(n))
            } else {
                zero(&bufNew, Int(n))
            }
            // Runs of differing 512-byte blocks get the old content.
            let count = Int(n)
            var i = 0
            while i < count {
                guard let d = CompareOperation.firstDifferentBlock(from: i, bufOld, bufNew, count) else { break }
                let e = CompareOperation.firstEqualBlock(from: d, bufOld, bufNew, count)
                if oldIsZero {
                    try writeZeroes(image, at: offset + UInt64(d), length: UInt64(e - d))
                } else {
                    try bufOld.withUnsafeBytes { try image.write(UnsafeRawBufferPointer(rebasing: $0[d..<e]), at: offset + UInt64(d)) }
                }
                i = e
            }
            offset += n
            progress(offset, size)
        }
    }

    /// Whether a backing chain reads [offset, offset+run) as zeros by its block status
    /// (no chain, or past its end: zeros for all of `n`).
    static func zeroRun(_ status: ChainStatus?, _ offset: UInt64, _ n: UInt64) throws -> (Bool, UInt64) {
        guard let status, offset < status.image.virtualSize else { return (true, n) }
        let s = try status.status(at: offset)
        return (s.flags.zero, min(n, s.length))
    }

    static func zero(_ buf: inout [UInt8], _ n: Int) {
        buf.withUnsafeMutableBytes { b in
            _ = UnsafeMutableRawBufferPointer(rebasing: b[0..<n]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    static func fill(_ buf: inout [UInt8], from img: any DiskImage, _ offset: UInt64, _ n: Int) throws {
        try buf.withUnsafeMutableBytes { b in try img.read(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<n]), at: offset) }
    }

    /// Makes a range read as zeros whatever backing file the image gets afterwards:
    /// zero flags for whole (sub)clusters of a version 3 image, zero data elsewhere
    /// (an unallocated range that merely reads as zeros now would not stay zero).
    static func writeZeroes(_ image: QCow2Image, at offset: UInt64, length: UInt64) throws {
        let end = offset + length
        var plain: [(UInt64, UInt64)] = []
        if image.header.version >= 3 {
            let unit = UInt64(1) << UInt64(image.geometry.subclusterBits)
            var a = (offset + unit - 1) & ~(unit - 1)
            var b = end & ~(unit - 1)
            // A partial unit that reads as zeros as a whole becomes a zero unit too (as
            // QEMU does); otherwise its part of the range is written as zero data.
            if a > offset, try wholeUnitReadsZero(image, a - unit, unit) { a -= unit }
            if b < end, b >= a, try wholeUnitReadsZero(image, b, unit) { b += unit }
            if a < b {
                try image.writeZeroes(at: a, length: b - a)
                plain = [(offset, min(a, end)), (max(b, offset), end)]
            } else {
                plain = [(offset, end)]
            }
        } else {
            plain = [(offset, end)]
        }
        for (a, b) in plain where a < b {
            var pos = a
            while pos < b {
                let n = min(b - pos, 1 << 20)
                try image.write([UInt8](repeating: 0, count: Int(n)), at: pos)
                pos += n
            }
        }
    }

    /// Whether the unit at `start` lies inside the disk and reads as zeros now.
    static func wholeUnitReadsZero(_ image: QCow2Image, _ start: UInt64, _ unit: UInt64) throws -> Bool {
        guard start + unit <= image.virtualSize else { return false }
        let bytes = try image.read(count: Int(unit), at: start)
        return CompareOperation.firstNonzeroBlock(bytes, bytes.count) == nil
    }

    /// Refuses, before anything is written, a header that would not fit in cluster 0.
    static func checkHeaderFits(_ image: QCow2Image, name: String?, format: String?) throws {
        var bytes: [UInt8] = []
        image.header.serialize(into: &bytes)
        var exts = image.extensions.filter { if case .backingFormat = $0 { return false } else { return true } }
        if name != nil, let f = format { exts.insert(.backingFormat(f), at: 0) }
        HeaderExtension.serialize(exts, into: &bytes)
        guard bytes.count + (name.map { PathCodec.encode($0).count } ?? 0) <= image.geometry.clusterSize else {
            throw QCow2Error.unsupported(path: image.path, detail: "the header with the new backing file name does not fit in one cluster")
        }
    }
}

extension QCow2Image {
    /// Points the header at a new backing file (or none): cluster 0 rewritten with one
    /// write, then synced.
    func rewriteBacking(name: String?, format: String?) throws {
        guard file.writable else {
            throw QCow2Error.invalidArgument(path: path, detail: "the image was opened read-only")
        }
        var h = header
        if h.version >= 3 { h.autoclearFeatures &= Features.autoclearBitmaps }
        var exts = extensions.filter { if case .backingFormat = $0 { return false } else { return true } }
        if name != nil, let f = format { exts.insert(.backingFormat(f), at: 0) }
        try MetadataTransaction(self).rewriteHeaderCluster(h, extensions: exts, backingName: name)
    }
}
