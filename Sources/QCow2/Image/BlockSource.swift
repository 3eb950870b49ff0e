/// What a run of guest bytes of a source is, as far as a copy needs to know.
public enum ExtentKind: Equatable, Sendable {
    /// May hold bytes other than zero: read and copy it.
    case data
    /// Reads as zeros and is recorded as such (a zero cluster, a hole of a raw file).
    case zero
    /// Nothing is there (in no layer of a chain): reads as zeros.
    case unallocated
}

/// A run of one kind starting at some guest offset.
public struct SourceExtent: Equatable, Sendable {
    public var kind: ExtentKind
    public var length: UInt64
    public init(_ kind: ExtentKind, length: UInt64) {
        self.kind = kind
        self.length = length
    }
}

/// Where a copy reads guest data from: a disk's size, its bytes, and what each range
/// holds. qcow2 images (through their backing chains) and raw images are sources
/// (`DiskImage` refines this protocol); `MemoryBlockSource` is one in memory. An NBD
/// export or a running QEMU's block job plugs in here without touching `CopyEngine`.
public protocol BlockSource: AnyObject {
    /// Names the source in errors (a file name for images).
    var path: String { get }
    var virtualSize: UInt64 { get }
    /// Fills `buffer` with the guest bytes at `offset` (the range must be inside the disk).
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
    /// The run starting at `offset` (< `virtualSize`): length ≥ 1, at most `maxLength`,
    /// never past the end of the disk.
    func extent(at offset: UInt64, maxLength: UInt64) throws -> SourceExtent
    /// Calls `body(start, extent)` for consecutive runs covering [start, end) (end
    /// clipped to the disk). Sources that answer a walk faster than single questions
    /// implement it; the default asks `extent(at:maxLength:)` run by run.
    func forEachExtent(from start: UInt64, to end: UInt64, _ body: (UInt64, SourceExtent) throws -> Void) throws
}

extension BlockSource {
    public func forEachExtent(from start: UInt64, to end: UInt64, _ body: (UInt64, SourceExtent) throws -> Void) throws {
        let end = min(end, virtualSize)
        var pos = start
        while pos < end {
            let e = try extent(at: pos, maxLength: end - pos)
            guard e.length > 0 else {
                throw QCow2Error.invalidArgument(path: path, detail: "the source reports an empty extent at offset \(pos)")
            }
            let n = min(e.length, end - pos)
            try body(pos, SourceExtent(e.kind, length: n))
            pos += n
        }
    }

    /// Reads `count` guest bytes at `offset` into a new array.
    public func read(count: Int, at offset: UInt64) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { (b: UnsafeMutableRawBufferPointer) throws in
            try self.read(into: b, at: offset)
        }
        return out
    }

    /// Checks that [offset, offset+count) lies inside the disk.
    func checkRange(_ offset: UInt64, _ count: Int) throws {
        guard count >= 0, offset <= virtualSize, UInt64(count) <= virtualSize - offset else {
            throw QCow2Error.invalidArgument(path: path, detail: "request at offset \(offset), \(count) bytes, is outside the image (size \(virtualSize))")
        }
    }
}
