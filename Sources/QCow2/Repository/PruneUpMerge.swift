/// A prune's upward merge, by the cluster maps: the kept point's file gets, where it does
/// not allocate a range itself, the content of the topmost expired point that does (data
/// copied whole, zero ranges as zeros); ranges no expired point allocates read from the
/// new parent (or are zeros without one) before and after, so they are never read. Then
/// only the header changes. A safe-mode rebase would read and compare the
/// whole old and new chains instead.
///
/// Idempotent: the copies read the kept point's old chain and are durable before the
/// header changes; once it has changed, every range an expired point allocates is
/// allocated in the kept point, so a repeated run copies nothing.
enum PruneUpMerge {
    static let chunk = 2 << 20

    /// `expired`: the expired points' files (absolute), newest first; `parentName`: the new
    /// backing file name (relative to `path`), nil for none.
    static func run(_ path: String, expired: [String], parentName: String?) throws {
        var opener = ImageOpener()
        opener.writable = true
        guard let image = try opener.open(path, format: .qcow2) as? QCow2Image else {
            throw QCow2Error.invalidArgument(path: path, detail: "not a qcow2 image")
        }
        let format = parentName == nil ? nil : ImageFormat.qcow2.rawValue
        try RebaseOperation.checkHeaderFits(image, name: parentName, format: format)
        let layers = try expired.map { try PointDigest.openAlone($0) }
        try copyAbsent(image, layers: layers)
        // Everything written is durable before the header changes (`rebase -u`).
        try image.close()
        try image.rewriteBacking(name: parentName, format: format)
    }

    static func copyAbsent(_ image: QCow2Image, layers: [QCow2Image]) throws {
        let size = image.virtualSize
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        var offset: UInt64 = 0
        while offset < size {
            let ext = try image.layerExtent(at: offset, maxLength: min(UInt64(chunk), size - offset))
            var n = ext.length
            if case .unallocated = ext.descriptor {
                let (source, length) = try topmost(layers, at: offset, maxLength: n)
                n = length
                switch source {
                case .none: break
                case .zero: try RebaseOperation.writeZeroes(image, at: offset, length: n)
                case .data:
                    let part = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(n)])
                    try image.read(into: part, at: offset)
                    try image.write(UnsafeRawBufferPointer(part), at: offset)
                }
            }
            offset += n
        }
    }

    enum Source { case none, zero, data }

    /// What the topmost layer allocating `offset` holds there, and for how long that
    /// stays so (at most `maxLength`).
    static func topmost(_ layers: [QCow2Image], at offset: UInt64, maxLength: UInt64) throws -> (Source, UInt64) {
        var n = maxLength
        for layer in layers {
            // Past a shorter layer's end its chain reads zeros.
            guard offset < layer.virtualSize else { return (.zero, n) }
            let e = try layer.layerExtent(at: offset, maxLength: n)
            n = min(n, e.length)
            switch e.descriptor {
            case .unallocated: continue
            case .zero: return (.zero, n)
            case .normal, .compressed: return (.data, n)
            }
        }
        return (.none, n)
    }
}
