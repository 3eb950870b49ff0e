/// What `qemu-img commit` does.
public struct CommitOptions: Sendable {
    /// Format of the image to commit (probed when nil).
    public var format: ImageFormat?
    /// `-b BASE`: the image to commit into (any image below the top in its chain);
    /// nil: the direct backing file. Naming it also keeps the top as it is (as -d).
    public var base: String?
    /// `-d`: leave the top image as it is (otherwise it is emptied after the commit).
    public var keepTop = false
    public var cacheBytes = QCow2Image.defaultCacheBytes

    public init() {}
}

/// `qemu-img commit`: every range allocated above the base (data, zero clusters) is
/// written into the base through its crash-safe write path; once the base is durable,
/// the top is emptied (all clusters unallocated, so it reads through to the base)
/// unless `-d` or `-b` was given. The guest content of the top never changes.
public enum CommitOperation {
    static let ioSize = 1 << 20

    enum Source { case none, zero, data }

    public static func run(_ path: String, options: CommitOptions,
                           progress: (UInt64, UInt64) -> Void = { _, _ in }) throws {
        let top = try openTop(path, options: options)
        let chain = try layersAboveBase(top, path: path, options: options)
        let base = try openBase(chain, options: options)
        let size = top.virtualSize
        if size > base.virtualSize {
            // qemu-img grows the base to the size of the top.
            if let q = base as? QCow2Image {
                try q.resize(to: size, allowShrink: false)
            } else {
                try base.file.truncate(to: size)
            }
        }
        try copy(chain.layers, into: base, size: size, progress: progress)
        // The base first, durable; only then the top may stop holding the data.
        if let q = base as? QCow2Image {
            try q.close()
        } else {
            try base.file.fullSync()
        }
        if options.base == nil && !options.keepTop {
            try top.deallocateAll()
        }
        try top.close()
    }

    /// The top image, for writing (it may be emptied), without its chain.
    static func openTop(_ path: String, options: CommitOptions) throws -> QCow2Image {
        var topOpener = ImageOpener()
        topOpener.writable = true
        topOpener.openBacking = false
        topOpener.cacheBytes = options.cacheBytes
        let opened = try topOpener.open(path, format: options.format)
        guard let top = opened as? QCow2Image, top.backingFileName != nil else {
            throw QCow2Error.invalidArgument(path: "", detail: "Image does not have a backing file")
        }
        return top
    }

    /// The layers above the base, top first (intermediate ones read-only, linked as each
    /// other's backing), and where the base is.
    struct Chain {
        var layers: [QCow2Image]
        /// The lowest layer above the base: the base becomes its backing image.
        var lowest: QCow2Image
        var basePath: String
        var baseFormat: ImageFormat?
    }

    static func layersAboveBase(_ top: QCow2Image, path: String, options: CommitOptions) throws -> Chain {
        func notFound() -> QCow2Error {
            .invalidArgument(path: "", detail: "Did not find '\(options.base ?? "")' in the backing chain of '\(path)'")
        }
        var wanted: FileIdentity?
        if let b = options.base {
            guard let id = try? BlockFile(path: b).identity() else { throw notFound() }
            wanted = id
        }
        var layers: [QCow2Image] = [top]
        var seen: Set<FileIdentity> = [try top.file.identity()]
        var current = top
        while true {
            guard let name = current.backingFileName else { throw notFound() }
            let declared: ImageFormat?
            do { declared = try current.backingFormat.map { try ImageFormat(name: $0, path: current.path) } } catch {
                throw QCow2Error.backing(path: current.path, detail: "backing file '\(name)' has unsupported format '\(current.backingFormat ?? "")'")
            }
            let loc = try BackingName.locate(name, format: declared, relativeTo: current.path)
            let full = loc.path
            let fmt = loc.format
            let id = try? BlockFile(path: full).identity()
            if wanted == nil || id == wanted {
                return Chain(layers: layers, lowest: current, basePath: full, baseFormat: fmt)
            }
            guard let id, !seen.contains(id) else { throw notFound() }
            seen.insert(id)
            var o = ImageOpener()
            o.openBacking = false
            o.cacheBytes = options.cacheBytes
            guard let mid = try o.open(full, format: fmt) as? QCow2Image else { throw notFound() }
            current.backing = mid
            layers.append(mid)
            current = mid
        }
    }

    /// The base, for writing, as the backing image of the lowest layer.
    static func openBase(_ chain: Chain, options: CommitOptions) throws -> any DiskImage {
        var baseOpener = ImageOpener()
        baseOpener.writable = true
        baseOpener.cacheBytes = options.cacheBytes
        let base: any DiskImage
        do { base = try baseOpener.open(chain.basePath, format: chain.baseFormat) } catch let e as QCow2Error {
            if case .io(_, "open", let errno) = e {
                throw QCow2Error.backing(path: chain.lowest.path, detail: "could not open backing file '\(chain.basePath)': \(errnoDescription(errno))")
            }
            throw e
        }
        chain.lowest.backing = base
        return base
    }

    /// Writes every run allocated above the base (data, or zeros) into the base.
    static func copy(_ layers: [QCow2Image], into base: any DiskImage, size: UInt64,
                     progress: (UInt64, UInt64) -> Void) throws {
        let top = layers[0]
        var buffer = [UInt8](repeating: 0, count: ioSize)
        var offset: UInt64 = 0
        progress(0, size)
        while offset < size {
            let (length, source) = try aboveBase(layers, at: offset, maxLength: size - offset)
            switch source {
            case .none: break
            case .zero: try writeZeroes(base, at: offset, length: length, scratch: &buffer)
            case .data:
                var done: UInt64 = 0
                while done < length {
                    let n = Int(min(UInt64(ioSize), length - done))
                    try buffer.withUnsafeMutableBytes { b in
                        let part = UnsafeMutableRawBufferPointer(rebasing: b[0..<n])
                        try top.read(into: part, at: offset + done)
                        try write(base, UnsafeRawBufferPointer(part), at: offset + done)
                    }
                    done += UInt64(n)
                }
            }
            offset += length
            progress(offset, size)
        }
    }

    /// The run at `offset` as seen above the base: allocated in some layer (as data
    /// or zeros), or in none of them.
    static func aboveBase(_ layers: [QCow2Image], at offset: UInt64, maxLength: UInt64) throws -> (UInt64, Source) {
        var length = maxLength
        for (i, layer) in layers.enumerated() {
            // Past the end of an intermediate image the layers above read zeros.
            if i > 0 && offset >= layer.virtualSize { return (length, .zero) }
            let e = try layer.layerExtent(at: offset, maxLength: length)
            length = e.length
            switch e.descriptor {
            case .normal, .compressed: return (length, .data)
            case .zero: return (length, .zero)
            case .unallocated: continue
            }
        }
        return (length, .none)
    }

    static func write(_ image: any DiskImage, _ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        if let q = image as? QCow2Image {
            try q.write(data, at: offset)
        } else {
            // Raw: guest offset == file offset (the file may have just been grown).
            try image.file.write(data, at: offset)
        }
    }

    static func writeZeroes(_ image: any DiskImage, at offset: UInt64, length: UInt64, scratch: inout [UInt8]) throws {
        if let q = image as? QCow2Image {
            try q.writeZeroes(at: offset, length: length, unmap: true)
            return
        }
        for i in scratch.indices { scratch[i] = 0 }
        var done: UInt64 = 0
        while done < length {
            let n = Int(min(UInt64(scratch.count), length - done))
            try scratch.withUnsafeBytes { try image.file.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: offset + done) }
            done += UInt64(n)
        }
    }
}

extension QCow2Image {
    /// Makes every cluster of the active table unallocated, so that the image reads
    /// through to its backing file (qemu-img commit's "empty the top image").
    ///
    /// Per batch of L1 entries: the entries are cleared with one write and a sync,
    /// then the L2 tables and the clusters they referenced lose the active table's
    /// reference (snapshots keep theirs). A crash leaves at worst leaked clusters.
    func deallocateAll() throws {
        try guardingMetadata {
            let alloc = try requireAllocator()
            try clearUnknownAutoclearBits()
            let g = geometry
            let batch = 16
            var i = 0
            while i < l1Table.count {
                let end = min(l1Table.count, i + batch)
                var frees: [UInt64] = []
                var changed = false
                for j in i..<end where l1Table[j] != 0 {
                    changed = true
                    let l2 = L1Entry(l1Table[j]).l2Offset
                    guard l2 != 0 else { continue }
                    let table = try map.l2Table(at: l2, l1Index: j)
                    for k in 0..<g.l2Entries {
                        let e = map.l2Entry(table, k)
                        if e.raw == 0 { continue }
                        try map.validateForWrite(e, index: k, table: l2, refcounts: alloc)
                        frees += map.referencedClusters(e)
                    }
                    frees.append(l2 >> UInt64(g.clusterBits))
                }
                if changed {
                    var tx = try MetadataTransaction(self)
                    try tx.commitRefcounts()
                    try tx.clearL1(i..<end)
                    tx.free(frees)
                    try tx.finish()
                }
                i = end
            }
            decompressed.invalidate()
        }
    }
}
