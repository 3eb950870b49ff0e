/// A disk held in memory as a sparse list of runs (data with its bytes, recorded zeros;
/// the gaps are unallocated): a `BlockSource` for tests of the copy without any image
/// file, and a model of what a network source reports. Memory is the data written.
public final class MemoryBlockSource: BlockSource {
    struct Run {
        var start: UInt64
        var length: UInt64
        var kind: ExtentKind
        /// The bytes of a data run (`length` of them); empty otherwise.
        var bytes: [UInt8]
        var end: UInt64 { start + length }
    }

    public let path: String
    public let virtualSize: UInt64
    /// Sorted by start, disjoint, never empty.
    private(set) var runs: [Run] = []

    public init(size: UInt64, name: String = "memory") {
        self.path = name
        self.virtualSize = size
    }

    /// `bytes` at `offset` become data (whatever they hold, zeros included).
    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try checkSpan(offset, UInt64(bytes.count))
        put(Run(start: offset, length: UInt64(bytes.count), kind: .data, bytes: bytes))
    }

    /// [offset, offset+length) becomes recorded zeros.
    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try checkSpan(offset, length)
        put(Run(start: offset, length: length, kind: .zero, bytes: []))
    }

    /// [offset, offset+length) becomes unallocated.
    public func discard(at offset: UInt64, length: UInt64) throws {
        try checkSpan(offset, length)
        cut(offset, offset + length)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkSpan(offset, UInt64(buffer.count))
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        let end = offset + UInt64(buffer.count)
        for r in runs[firstRun(endingAfter: offset)...] {
            guard r.start < end else { break }
            guard r.kind == .data else { continue }
            let a = max(r.start, offset), e = min(r.end, end)
            r.bytes.withUnsafeBytes { src in
                let from = UnsafeRawBufferPointer(rebasing: src[Int(a - r.start)..<Int(e - r.start)])
                UnsafeMutableRawBufferPointer(rebasing: buffer[Int(a - offset)..<Int(e - offset)]).copyMemory(from: from)
            }
        }
    }

    public func extent(at offset: UInt64, maxLength: UInt64) throws -> SourceExtent {
        guard offset < virtualSize, maxLength > 0 else {
            throw QCow2Error.invalidArgument(path: path, detail: "extent query at \(offset) is outside the disk")
        }
        let limit = min(maxLength, virtualSize - offset)
        let i = firstRun(endingAfter: offset)
        guard i < runs.count else { return SourceExtent(.unallocated, length: limit) }
        let r = runs[i]
        if r.start > offset { return SourceExtent(.unallocated, length: min(limit, r.start - offset)) }
        return SourceExtent(r.kind, length: min(limit, r.end - offset))
    }

    private func checkSpan(_ offset: UInt64, _ length: UInt64) throws {
        guard offset <= virtualSize, length <= virtualSize - offset else {
            throw QCow2Error.invalidArgument(path: path, detail: "range at offset \(offset), \(length) bytes, is outside the disk (size \(virtualSize))")
        }
    }

    /// Index of the first run that ends after `offset` (runs.count if none).
    private func firstRun(endingAfter offset: UInt64) -> Int {
        var lo = 0, hi = runs.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if runs[mid].end <= offset { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    private func put(_ run: Run) {
        guard run.length > 0 else { return }
        cut(run.start, run.end)
        runs.insert(run, at: firstRun(endingAfter: run.start))
    }

    /// Removes [a, e) from the runs, keeping the parts of runs outside it.
    private func cut(_ a: UInt64, _ e: UInt64) {
        guard a < e else { return }
        var i = firstRun(endingAfter: a)
        var kept: [Run] = []
        let first = i
        while i < runs.count && runs[i].start < e {
            let r = runs[i]
            if r.start < a { kept.append(part(r, r.start, a)) }
            if r.end > e { kept.append(part(r, e, r.end)) }
            i += 1
        }
        runs.replaceSubrange(first..<i, with: kept)
    }

    private func part(_ r: Run, _ a: UInt64, _ e: UInt64) -> Run {
        let bytes = r.kind == .data ? Array(r.bytes[Int(a - r.start)..<Int(e - r.start)]) : []
        return Run(start: a, length: e - a, kind: r.kind, bytes: bytes)
    }
}
