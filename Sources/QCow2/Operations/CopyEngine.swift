#if canImport(Glibc)
import Glibc
#endif

/// Copies guest data from a source (an image through its backing chain, or any other
/// `BlockSource`) into an image: the engine of `convert` and `backup`. Ranges that read
/// as zeros stay sparse.
public struct CopyEngine {
    public let source: any BlockSource
    public let target: any DiskImage
    /// Where the target's backing file reads differently from zero, zeros must be
    /// written explicitly (they would otherwise show the backing data).
    public var targetBacking: (any BlockSource)?
    public var compressed = false
    /// How zlib-type compressed clusters are encoded.
    public var zlibEncoder = ZlibEncoder.igzip
    /// Zero runs at least this long are not written (qemu-img's -S); 0 writes everything.
    public var minSparse: UInt64 = 4096
    /// Zero runs are looked for in aligned pieces of this size (nil: the unit); convert
    /// derives it from -S. Compressed copies always work in whole clusters.
    public var sparseUnit: UInt64?
    /// Called after each chunk with the bytes done so far.
    public var progress: ((UInt64) -> Void)?
    /// Checked between chunks; returning true stops the copy with an error.
    public var shouldStop: () -> Bool = { false }
    /// Bytes per second (0: unlimited).
    public var speed: UInt64 = 0
    /// Start writeback of the target as the copy goes (it is fsynced at the end).
    public var earlyWriteback = true
    /// Told of every data write (nil: nothing to tell).
    var observer: (any CopyObserver)?
    /// Guest ranges written so far, at cluster granularity, when set to an empty bitmap
    /// before the copy (bitmap-mode=always: `CopySettings.tracksCopied`); nil otherwise.
    public internal(set) var copied: DirtyBitmap?
    public internal(set) var bytesCopied: UInt64 = 0
    public internal(set) var bytesDone: UInt64 = 0

    public init(source: any BlockSource, target: any DiskImage) {
        self.source = source
        self.target = target
    }

    /// The unit of work: the target's cluster (whole clusters are what a backup holds).
    public var unit: UInt64 { UInt64((target as? QCow2Image)?.geometry.clusterSize ?? 65536) }

    private var started: UInt64 = 0
    /// The chunk buffer, reused from one copy to the next.
    private var buffer: [UInt8] = []
    /// Bytes read and written per step (compressed copies: `CompressionPipeline`'s chunks).
    private var chunk: UInt64 { max(unit, 2 << 20) / unit * unit }
    var writebackMark: UInt64 = 0
    /// The compressed copy's buffers and workers, kept from one copy to the next.
    var pipeline: CompressionPipeline?
    /// Data written between two early-writeback requests (see BlockFile.startWriteback).
    static let writebackInterval: UInt64 = 16 << 20

    /// Copies [offset, offset+length) (whole units); with `maskZeros`, zero data is
    /// written as zero clusters so that it hides what the target's backing file holds.
    public mutating func copy(_ offset: UInt64, _ length: UInt64, maskZeros: Bool) throws {
        if compressed, let q = target as? QCow2Image, q.geometry.isAligned(offset) {
            return try copyCompressed(into: q, offset, length, maskZeros: maskZeros)
        }
        let size = source.virtualSize
        let chunk = self.chunk
        var pos = offset
        let end = min(size, offset + length)
        if buffer.count != Int(chunk) { buffer = [UInt8](repeating: 0, count: Int(chunk)) }
        var backingBuf: [UInt8] = []
        while pos < end {
            if shouldStop() { throw QCow2Error.io(path: target.path, operation: "copy", errno: EINTR) }
            let n = Int(min(chunk, end - pos))
            try buffer.withUnsafeMutableBytes { try source.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: pos) }
            let buf = buffer
            // Split the chunk into units: all-zero units are skipped or masked; runs of
            // data units are written with one request (compressed: one per cluster).
            var u = 0
            var runStart = 0
            let zeroUnit = compressed ? unit : (sparseUnit ?? unit)
            func flushData(upTo end: Int) throws {
                guard end > runStart else { return }
                let guest = pos + UInt64(runStart)
                try buf.withUnsafeBytes { try writeData(UnsafeRawBufferPointer(rebasing: $0[runStart..<end]), at: guest) }
                bytesCopied += UInt64(end - runStart)
                copied?.set(guest, UInt64(end - runStart))
            }
            while u < n {
                let len = min(Int(zeroUnit - (pos + UInt64(u)) % zeroUnit), n - u)
                if minSparse > 0 && Self.allZero(buf, u, len) {
                    try flushData(upTo: u)
                    runStart = u + len
                    let guest = pos + UInt64(u)
                    let hidden = try maskZeros || backingHasData(guest, len, &backingBuf)
                    if hidden {
                        try writeZeros(guest, UInt64(len))
                        copied?.set(guest, UInt64(len))
                    }
                }
                u += len
            }
            try flushData(upTo: n)
            pos += UInt64(n)
            bytesDone += UInt64(n)
            if earlyWriteback && bytesCopied - writebackMark >= Self.writebackInterval {
                writebackMark = bytesCopied
                target.file.startWriteback()
            }
            progress?(bytesDone)
            try throttle()
        }
    }

    func backingHasData(_ guest: UInt64, _ len: Int, _ buf: inout [UInt8]) throws -> Bool {
        guard let b = targetBacking, guest < b.virtualSize else { return false }
        let n = Int(min(UInt64(len), b.virtualSize - guest))
        if buf.count < n { buf = [UInt8](repeating: 0, count: n) }
        try buf.withUnsafeMutableBytes { try b.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: guest) }
        return !Self.allZero(buf, 0, n)
    }

    static func allZero(_ b: [UInt8], _ start: Int, _ len: Int) -> Bool {
        b.withUnsafeBytes { allZero($0, start, len) }
    }

    static func allZero(_ p: UnsafeRawBufferPointer, _ start: Int, _ len: Int) -> Bool {
        var i = start
        let end = start + len
        while i + 8 <= end {
            if p.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < end { if p[i] != 0 { return false }; i += 1 }
        return true
    }

    func writeZeros(_ guest: UInt64, _ len: UInt64) throws {
        if let q = target as? QCow2Image {
            try q.writeZeroes(at: guest, length: len)
        } else if let r = target as? RawImage {
            try [UInt8](repeating: 0, count: Int(len)).withUnsafeBytes { try r.write($0, at: guest) }
        }
    }

    private func writeData(_ data: UnsafeRawBufferPointer, at guest: UInt64) throws {
        if let q = target as? QCow2Image {
            try q.write(data, at: guest)
        } else if let r = target as? RawImage {
            try r.write(data, at: guest)
        }
        try observer?.wroteData(data, at: guest)
    }

    mutating func throttle() throws {
        guard speed > 0 else { return }
        let now = monotonicNanoseconds()
        if started == 0 { started = now }
        let due = started + bytesDone * 1_000_000_000 / speed
        if due > now { sleepNanoseconds(due - now) }
    }

    /// Sorts, aligns to `unit` and merges ranges (clipped to `size`).
    public static func normalize(_ ranges: [(UInt64, UInt64)], unit: UInt64, size: UInt64) -> [(UInt64, UInt64)] {
        var out: [(UInt64, UInt64)] = []
        for (a, n) in ranges.sorted(by: { $0.0 < $1.0 }) where n > 0 {
            let s = a / unit * unit
            let e = min(size, (a + n + unit - 1) / unit * unit)
            if let last = out.last, last.0 + last.1 >= s {
                out[out.count - 1].1 = max(last.0 + last.1, e) - last.0
            } else {
                out.append((s, e - s))
            }
        }
        return out
    }

    /// Ranges of the source that may hold data (through its whole chain), merged.
    public static func nonZeroRanges(_ source: any BlockSource) throws -> [(UInt64, UInt64)] {
        var out: [(UInt64, UInt64)] = []
        try source.forEachExtent(from: 0, to: source.virtualSize) { start, e in
            guard e.kind == .data else { return }
            if let last = out.last, last.0 + last.1 == start { out[out.count - 1].1 += e.length } else { out.append((start, e.length)) }
        }
        return out
    }
}

func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

func sleepNanoseconds(_ ns: UInt64) {
    var request = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}
