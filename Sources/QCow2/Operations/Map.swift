/// One entry of `map`: a run of guest bytes with one status, as qemu-img reports it.
public struct MapEntry: Equatable, Sendable {
    public var start: UInt64
    public var length: UInt64
    /// Number of backing layers below the top that were looked at.
    public var depth: Int
    /// Allocated in some layer (not just "reads as zero because nothing is there").
    public var present: Bool
    public var zero: Bool
    public var data: Bool
    /// Host offset, when the data sits uncompressed at a known place.
    public var offset: UInt64?
    /// The file that holds `offset`.
    public var filename: String?

    /// Whether `next` continues this entry (same status, contiguous host offsets).
    public func canMerge(_ next: MapEntry) -> Bool {
        guard length > 0, zero == next.zero, data == next.data, depth == next.depth,
              present == next.present, filename == next.filename, (offset == nil) == (next.offset == nil)
        else { return false }
        if let o = offset, let n = next.offset { return o + length == n }
        return true
    }
}

/// Block status of a chain, computed the way QEMU's block layer does, so that
/// `map` output matches qemu-img: per layer, then through the backing chain,
/// with the host file's holes (SEEK_DATA/SEEK_HOLE) consulted where QEMU does.
public final class BlockStatus {
    let top: any DiskImage
    private var preallocationChecked: [ObjectIdentifier: Bool] = [:]

    public init(_ top: any DiskImage) { self.top = top }

    struct Status {
        var data = false
        var zero = false
        var allocated = false
        var offset: UInt64?
        var file: String?
        var length: UInt64
        var eof = false
    }

    /// The status of the host file at `offset` (file-posix semantics: sizes rounded
    /// up to 512 bytes, holes from SEEK_DATA/SEEK_HOLE).
    static func fileStatus(_ file: BlockFile, at offset: UInt64, bytes: UInt64) throws -> Status {
        let raw = try file.size()
        let total = (raw + 511) & ~UInt64(511)
        if offset >= total { return Status(length: 0, eof: true) }
        let n = min(bytes, total - offset)
        var s = Status(length: n)
        switch file.findAllocation(at: offset) {
        case .some(nil):  // trailing hole
            s.zero = true
        case .some(let r?):
            if r.data == offset {
                s.data = true
                s.length = min(n, r.hole - offset)
            } else {
                s.zero = true
                s.length = min(n, r.data - offset)
            }
        case nil:  // no information: all data
            s.data = true
        }
        if s.length == 0 { s.length = n }
        s.allocated = true
        s.offset = offset
        s.file = file.path
        s.eof = offset + s.length == total
        return s
    }

    /// QEMU's heuristic: an image whose refcounted clusters reach well past the
    /// bytes the file really occupies was preallocated, and then the file's holes
    /// are consulted for data clusters too.
    func hasMetadataPreallocation(_ img: QCow2Image) throws -> Bool {
        let key = ObjectIdentifier(img)
        if let v = preallocationChecked[key] { return v }
        let fileLength = (try img.file.size() + 511) & ~UInt64(511)
        let realClusters = Int64(try img.file.allocatedSize() / UInt64(img.geometry.clusterSize))
        let threshold = max(realClusters * 10 / 9, realClusters + 2)
        let used = try RefcountReader(image: img).countUsedClusters(fileLength: fileLength, stopAt: threshold)
        let v = used >= threshold
        preallocationChecked[key] = v
        return v
    }

    /// Status of one layer (no backing lookup).
    func layerStatus(_ img: any DiskImage, at offset: UInt64, bytes: UInt64) throws -> Status {
        if let raw = img as? RawImage {
            return try Self.fileStatus(raw.file, at: offset, bytes: bytes)
        }
        let e = try img.layerExtent(at: offset, maxLength: bytes)
        var s = Status(length: e.length)
        var recurse = false
        // As QEMU: host offsets are in the external data file when there is one, and
        // an encrypted image reports none.
        let q = img as? QCow2Image
        let dataFile = q?.dataFile ?? img.file
        let hostOffset: (UInt64?) -> UInt64? = { q?.encryption == nil ? $0 : nil }
        switch e.descriptor {
        case .normal(let h):
            s.data = true; s.offset = hostOffset(h); s.file = dataFile.path
            if let q, s.offset != nil, try hasMetadataPreallocation(q) { recurse = true }
        case .compressed:
            s.data = true
        case .zero(let h):
            s.zero = true
            if let h = hostOffset(h) { s.offset = h; s.file = dataFile.path }
        case .unallocated(let h):
            if let h = hostOffset(h) { s.offset = h; s.file = dataFile.path }
        }
        if s.data || s.zero {
            s.allocated = true
        } else if let b = img.backing {
            if offset >= b.virtualSize { s.zero = true }
        } else {
            s.zero = true
        }
        if recurse, let host = s.offset {
            let f = try Self.fileStatus(dataFile, at: host, bytes: s.length)
            if f.eof && (f.length == 0 || f.zero) {
                s.zero = true
            } else {
                s.length = f.length
                if f.zero { s.zero = true }
            }
        }
        return s
    }

    /// The map entry for the run starting at `offset` (at most `bytes` long).
    public func entry(at offset: UInt64, bytes: UInt64) throws -> MapEntry {
        var depth = 0
        var layer: any DiskImage = top
        var s: Status
        var bytes = bytes
        while true {
            s = try layerStatus(layer, at: offset, bytes: bytes)
            bytes = s.length
            if s.data || s.zero { break }
            guard let b = layer.backing else { s = Status(length: s.length); break }
            layer = b
            depth += 1
        }
        return MapEntry(start: offset, length: s.length, depth: depth, present: s.allocated, zero: s.zero,
                        data: s.data, offset: s.offset, filename: s.offset != nil ? s.file : nil)
    }
}

public enum MapOperation {
    /// Calls `emit` with the merged map entries of [start, start+maxLength) ∩ disk.
    public static func run(_ image: any DiskImage, start: UInt64 = 0, maxLength: UInt64? = nil,
                           emit: (MapEntry) throws -> Void) throws {
        let size = image.virtualSize
        var end = size
        if let m = maxLength { end = min(size, start.addingReportingOverflow(m).overflow ? size : start + m) }
        guard start < end else {
            // qemu-img prints one empty entry for an empty range.
            try emit(MapEntry(start: start, length: 0, depth: 0, present: false, zero: false, data: false))
            return
        }
        let status = BlockStatus(image)
        var curr: MapEntry?
        var pos = start
        while pos < end {
            let next = try status.entry(at: pos, bytes: end - pos)
            pos += next.length
            if var c = curr, c.canMerge(next) {
                c.length += next.length
                curr = c
            } else {
                if let c = curr { try emit(c) }
                curr = next
            }
        }
        if let c = curr { try emit(c) }
    }
}
