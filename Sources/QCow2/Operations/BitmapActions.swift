/// `qemu-img bitmap` actions, applied in order and committed together: either every
/// action succeeds and the image switches to the new set of bitmaps with one
/// header write, or nothing on disk changes.
public enum BitmapAction: Equatable, Sendable {
    case add(granularity: UInt64?, disabled: Bool)
    case remove
    case clear
    case enable
    case disable
    /// Merge bitmap `source` (of `image`, or of another image already loaded by the caller).
    case merge(source: String)

    public var name: String {
        switch self {
        case .add: return "add"
        case .remove: return "remove"
        case .clear: return "clear"
        case .enable: return "enable"
        case .disable: return "disable"
        case .merge: return "merge"
        }
    }
}

extension QCow2Image {
    /// The default granularity of a new bitmap: the cluster size clamped to 4 KiB .. 64 KiB.
    public var defaultBitmapGranularity: UInt64 { UInt64(min(max(geometry.clusterSize, 4096), 65536)) }

    /// Applies `actions` to bitmap `name`. `mergeSource` supplies bitmaps of another image
    /// for `.merge` (nil: merge from this image).
    public func applyBitmapActions(_ actions: [BitmapAction], to name: String,
                                   mergeSource: ((String) throws -> DirtyBitmap)? = nil) throws {
        try applyBitmapActions(actions.map { ($0, name) }, mergeSource: mergeSource)
    }

    /// Applies each action to the bitmap named with it, all committed together (one
    /// directory switch): e.g. a backup repository's new bitmap added and the previous
    /// one removed at once.
    public func applyBitmapActions(_ steps: [(BitmapAction, String)],
                                   mergeSource: ((String) throws -> DirtyBitmap)? = nil) throws {
        _ = try requireAllocator()
        var edit = BitmapEdit(image: self, name: steps.last?.1 ?? "",
                              entries: header.autoclearFeatures & Features.autoclearBitmaps != 0 ? bitmaps : [])
        for (a, stepName) in steps {
            edit.name = stepName
            try edit.apply(a, mergeSource: mergeSource)
        }
        // Commit: new data and tables, then the directory switch, then frees. A first
        // bitmap whose extension cannot fit in the header is refused before any write.
        let entries = edit.entries
        if !entries.isEmpty {
            do { try checkBitmapsExtensionFits() } catch let e as QCow2Error {
                throw QCow2Error.bitmapOperation(path: path, action: steps.last?.0.name ?? "add", bitmap: edit.name, reason: e.message, inconsistent: nil)
            }
        }
        try clearUnknownAutoclearBits()
        var freeing: [UInt64] = []
        for r in edit.removed { freeing += try bitmapClusters(r) }
        // Durable when it returns: no flush of its own.
        try commitBitmapSet(entries, newData: edit.data, freeing: freeing)
    }

    /// A consistent bitmap by name (for dumps, merges from another image, backups).
    public func consistentBitmap(_ name: String) throws -> (BitmapDirectoryEntry, DirtyBitmap) {
        guard header.autoclearFeatures & Features.autoclearBitmaps != 0,
              let e = bitmaps.first(where: { $0.name == name }) else {
            throw QCow2Error.invalidArgument(path: path, detail: "Dirty bitmap '\(name)' not found")
        }
        guard !e.inUse else {
            throw QCow2Error.bitmapInconsistent(path: path, bitmap: name)
        }
        return (e, try loadBitmap(e))
    }
}

/// The bitmap directory being edited by a list of actions, in memory: nothing is written
/// until every action succeeded.
private struct BitmapEdit {
    let image: QCow2Image
    /// The bitmap the current action names.
    var name: String
    var entries: [BitmapDirectoryEntry]
    /// New content of bitmaps that change.
    var data: [String: DirtyBitmap] = [:]
    var removed: [BitmapDirectoryEntry] = []

    init(image: QCow2Image, name: String, entries: [BitmapDirectoryEntry]) {
        self.image = image
        self.name = name
        self.entries = entries
    }

    func fail(_ a: BitmapAction, _ reason: String, inconsistent: String? = nil) -> QCow2Error {
        .bitmapOperation(path: image.path, action: a.name, bitmap: name, reason: reason, inconsistent: inconsistent)
    }

    func inconsistent(_ a: BitmapAction, _ bitmap: String) -> QCow2Error {
        fail(a, "Bitmap '\(bitmap)' is inconsistent and cannot be used", inconsistent: bitmap)
    }

    /// The index of the bitmap the action names, which must exist and (`consistent`) not be in use.
    func existing(_ a: BitmapAction, consistent: Bool = true) throws -> Int {
        guard let i = entries.firstIndex(where: { $0.name == name }) else { throw fail(a, "Dirty bitmap '\(name)' not found") }
        if consistent && entries[i].inUse { throw inconsistent(a, name) }
        return i
    }

    mutating func apply(_ a: BitmapAction, mergeSource: ((String) throws -> DirtyBitmap)?) throws {
        switch a {
        case .add(let g, let disabled):
            try add(a, granularity: g, disabled: disabled)
        case .remove:
            let i = try existing(a, consistent: false)
            if entries[i].tableOffset != 0 { removed.append(entries[i]) }
            entries.remove(at: i)
            data[name] = nil
        case .clear:
            let i = try existing(a)
            data[name] = DirtyBitmap(granularity: entries[i].granularity, size: image.virtualSize)
        case .enable, .disable:
            let i = try existing(a)
            if a == .enable { entries[i].flags |= BitmapDirectoryEntry.flagAuto } else { entries[i].flags &= ~BitmapDirectoryEntry.flagAuto }
        case .merge(let source):
            let i = try existing(a)
            let src: DirtyBitmap
            if let mergeSource {
                src = try mergeSource(source)
            } else {
                guard let s = entries.first(where: { $0.name == source }) else { throw fail(a, "Dirty bitmap '\(source)' not found") }
                guard !s.inUse else { throw inconsistent(a, source) }
                src = try data[source] ?? image.loadBitmap(s)
            }
            var target = try data[name] ?? image.loadBitmap(entries[i])
            target.merge(src)
            data[name] = target
        }
    }

    /// A new, empty bitmap, refused as qemu-img refuses it.
    mutating func add(_ a: BitmapAction, granularity g: UInt64?, disabled: Bool) throws {
        let path = image.path
        guard !entries.contains(where: { $0.name == name }) else { throw fail(a, "Bitmap already exists: \(name)") }
        guard image.header.version >= 3 else {
            throw fail(a, "Can't make bitmap '\(name)' persistent in '\(path)': Cannot store dirty bitmaps in qcow2 v2 files")
        }
        let nameBytes = name.utf8.count
        guard nameBytes >= 1 else { throw fail(a, "Bitmap name cannot be empty") }
        guard nameBytes <= BitmapDirectoryEntry.maxNameSize else {
            throw fail(a, "Can't make bitmap '\(name)' persistent in '\(path)': Name length exceeds maximum (1023 characters)")
        }
        let gran = g ?? image.defaultBitmapGranularity
        guard gran >= 512, gran <= 1 << 31, gran & (gran - 1) == 0 else {
            throw fail(a, "Granularity must be power of 2 and at least 512")
        }
        let geometry = image.geometry
        let tableSize = BitmapDirectoryEntry.tableSize(diskSize: image.virtualSize, granularityBits: gran.trailingZeroBitCount, clusterSize: geometry.clusterSize)
        guard tableSize <= BitmapDirectoryEntry.maxTableEntries,
              tableSize << UInt64(geometry.clusterBits) <= BitmapDirectoryEntry.maxDataBytes else {
            throw fail(a, "Can't make bitmap '\(name)' persistent in '\(path)': Too much space will be occupied by the bitmap. Use larger granularity")
        }
        guard entries.count < Int(BitmapsExtension.maxBitmaps) else {
            throw fail(a, "Can't make bitmap '\(name)' persistent in '\(path)': Too many bitmaps (at most 65535)")
        }
        let dirBytes = entries.reduce(0) { $0 + (24 + $1.name.utf8.count + 7) & ~7 } + (24 + nameBytes + 7) & ~7
        guard UInt64(dirBytes) <= BitmapsExtension.maxDirectorySize else {
            throw fail(a, "Can't make bitmap '\(name)' persistent in '\(path)': the bitmap directory would be too large")
        }
        entries.append(BitmapDirectoryEntry(tableOffset: 0, tableSize: 0, flags: disabled ? 0 : BitmapDirectoryEntry.flagAuto,
                                            type: 1, granularityBits: UInt8(gran.trailingZeroBitCount), name: name, extraData: []))
        data[name] = DirtyBitmap(granularity: gran, size: image.virtualSize)
    }
}
