import CNBD

/// An NBD export as the source of a copy: its bytes through NBD_CMD_READ, the kind of
/// each range from the `base:allocation` meta context (hole+zero: unallocated, zero:
/// zero, otherwise data). A server without that context reports everything as data.
public final class NBDSource: BlockSource {
    public static let allocationContext = LIBNBD_CONTEXT_BASE_ALLOCATION
    public let client: NBDClient
    public var path: String { client.uri }
    public var virtualSize: UInt64 { client.size }
    private let allocationKnown: Bool
    private var readAhead: NBDReadAhead?

    /// `client` must have asked for `allocationContext` to tell holes from data.
    public init(_ client: NBDClient) {
        self.client = client
        allocationKnown = client.offers(Self.allocationContext)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset, buffer.count)
        let done = try readAhead?.read(into: buffer, at: offset) ?? 0
        guard done < buffer.count else { return }
        try client.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), at: offset + UInt64(done))
    }

    /// Announces the ranges a copy will read next, in order (sorted, not overlapping):
    /// reads of them are then overlapped, `depth` requests of `pieceSize` bytes in flight.
    public func willRead(_ ranges: [(UInt64, UInt64)], depth: Int = 8, pieceSize: Int = 2 << 20) {
        readAhead = NBDReadAhead(client, ranges: ranges, depth: depth, pieceSize: pieceSize)
    }

    /// The first extent of one block-status request.
    public func extent(at offset: UInt64, maxLength: UInt64) throws -> SourceExtent {
        guard offset < virtualSize else { throw QCow2Error.invalidArgument(path: path, detail: "offset \(offset) is past the end of the export") }
        let length = min(maxLength, virtualSize - offset)
        guard allocationKnown else { return SourceExtent(.data, length: length) }
        let e = try allocation(at: offset, length: length)[0]
        return SourceExtent(Self.kind(e.flags), length: e.length)
    }

    /// One block-status request per run of extents the server returns.
    public func forEachExtent(from start: UInt64, to end: UInt64, _ body: (UInt64, SourceExtent) throws -> Void) throws {
        let end = min(end, virtualSize)
        var pos = start
        guard allocationKnown else {
            if pos < end { try body(pos, SourceExtent(.data, length: end - pos)) }
            return
        }
        while pos < end {
            for e in try allocation(at: pos, length: end - pos) {
                try body(pos, SourceExtent(Self.kind(e.flags), length: e.length))
                pos += e.length
            }
        }
    }

    /// The base:allocation extents of one request (at least one).
    private func allocation(at offset: UInt64, length: UInt64) throws -> [NBDClient.Extent] {
        let list = try client.blockStatus(at: offset, length: length)[Self.allocationContext] ?? []
        guard !list.isEmpty else {
            throw QCow2Error.remote(path: path, detail: "the server's block status at offset \(offset) has no base:allocation extent")
        }
        return list
    }

    static func kind(_ flags: UInt32) -> ExtentKind {
        let hole = flags & UInt32(LIBNBD_STATE_HOLE) != 0, zero = flags & UInt32(LIBNBD_STATE_ZERO) != 0
        return zero ? (hole ? .unallocated : .zero) : .data
    }
}

/// The changes an NBD export's `qemu:dirty-bitmap:NAME` meta context reports (bit 0 of
/// an extent's flags: dirty), read once when made, kept at `granularity`. The bitmap
/// belongs to whoever set up the export (QEMU, libvirt): releasing the changes is theirs
/// once the backup is durable, so `consumed` and `partlyConsumed` change nothing.
public final class NBDDirtyChanges: ChangeSet {
    public let context: String
    private var dirty: DirtyBitmap

    public static func context(bitmap: String) -> String { "qemu:dirty-bitmap:" + bitmap }

    /// Reads the dirty extents of `bitmap` from `client`, which must have negotiated its
    /// context (`QCow2Error.unsupported` otherwise).
    public init(_ client: NBDClient, bitmap: String, granularity: UInt64) throws {
        context = Self.context(bitmap: bitmap)
        guard client.offers(context) else {
            throw QCow2Error.unsupported(path: client.uri, detail: "the export does not offer bitmap '\(bitmap)' (meta context \(context))")
        }
        dirty = DirtyBitmap(granularity: granularity, size: client.size)
        var pos: UInt64 = 0
        while pos < client.size {
            let list = try client.blockStatus(at: pos, length: client.size - pos)[context] ?? []
            guard !list.isEmpty else {
                throw QCow2Error.remote(path: client.uri, detail: "the server's block status at offset \(pos) has no \(context) extent")
            }
            for e in list {
                if e.flags & 1 != 0 { dirty.set(pos, e.length) }
                pos += e.length
            }
        }
    }

    public func forEachChangedRange(_ body: (UInt64, UInt64) -> Void) { dirty.forEachDirtyExtent(body) }
    public func consumed() throws {}
    public func partlyConsumed(_ copied: DirtyBitmap) throws {}
}
