/// qcow2 and raw images as copy sources: the kind of a range is what `map` reports for
/// the whole chain (QEMU's block status), so a copy leaves out exactly what qemu-img's
/// would.
extension DiskImage {
    public func extent(at offset: UInt64, maxLength: UInt64) throws -> SourceExtent {
        guard offset < virtualSize, maxLength > 0 else {
            throw QCow2Error.invalidArgument(path: path, detail: "extent query at \(offset) is outside the image")
        }
        let e = try BlockStatus(self).entry(at: offset, bytes: min(maxLength, virtualSize - offset))
        return SourceExtent(Self.kind(e), length: e.length)
    }

    /// One walk with one block-status state (QEMU's preallocation heuristic is decided
    /// once per image, not once per run).
    public func forEachExtent(from start: UInt64, to end: UInt64, _ body: (UInt64, SourceExtent) throws -> Void) throws {
        let end = min(end, virtualSize)
        guard start < end else { return }
        try MapOperation.run(self, start: start, maxLength: end - start) { e in
            if e.length > 0 { try body(e.start, SourceExtent(Self.kind(e), length: e.length)) }
        }
    }

    /// Data where some layer may hold non-zero bytes; zero where a layer records zeros;
    /// unallocated where no layer holds anything.
    static func kind(_ e: MapEntry) -> ExtentKind {
        if e.data || !e.zero { return .data }
        return e.present ? .zero : .unallocated
    }
}
