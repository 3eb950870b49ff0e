/// An in-memory dirty bitmap: one bit per `granularity` bytes of guest data.
///
/// Storage is sparse: chunks of 2^18 bits (32 KiB) exist only where some bit is
/// set, so a huge, mostly clean bitmap costs memory in proportion to its dirty
/// areas, and iteration skips clean chunks (and clean words inside a chunk).
public struct DirtyBitmap: Equatable, Sendable {
    public let granularity: UInt64
    /// Bytes of guest data the bitmap covers.
    public private(set) var size: UInt64
    /// Number of bits: ceil(size / granularity).
    public var bitCount: UInt64 { size == 0 ? 0 : (size - 1) / granularity + 1 }

    static let chunkBitsLog2: UInt64 = 18
    static let wordsPerChunk = 1 << (18 - 6)
    private var chunks: [UInt64: [UInt64]] = [:]

    public init(granularity: UInt64, size: UInt64) {
        precondition(granularity > 0 && granularity & (granularity - 1) == 0)
        self.granularity = granularity
        self.size = size
    }

    public var isEmpty: Bool { chunks.isEmpty }

    /// Marks every granule touched by [offset, offset+length) dirty.
    public mutating func set(_ offset: UInt64, _ length: UInt64) {
        guard length > 0, offset < size else { return }
        let end = min(size, offset &+ length)
        setBits(offset / granularity, (end - 1) / granularity + 1, to: true)
    }

    /// Marks every granule touched by [offset, offset+length) clean.
    public mutating func reset(_ offset: UInt64, _ length: UInt64) {
        guard length > 0, offset < size else { return }
        let end = min(size, offset &+ length)
        setBits(offset / granularity, (end - 1) / granularity + 1, to: false)
    }

    public mutating func clear() { chunks.removeAll() }

    /// Whether the granule holding guest byte `offset` is dirty.
    public func test(_ offset: UInt64) -> Bool { bit(offset / granularity) }

    public func bit(_ n: UInt64) -> Bool {
        guard let c = chunks[n >> Self.chunkBitsLog2] else { return false }
        let inChunk = Int(n & ((1 << Self.chunkBitsLog2) - 1))
        return c[inChunk >> 6] & (1 << UInt64(inChunk & 63)) != 0
    }

    /// Sets bits [first, end) to `value`.
    public mutating func setBits(_ first: UInt64, _ end: UInt64, to value: Bool) {
        var n = first
        let end = min(end, bitCount)
        while n < end {
            let ci = n >> Self.chunkBitsLog2
            let chunkEnd = min(end, (ci + 1) << Self.chunkBitsLog2)
            if !value && chunks[ci] == nil { n = chunkEnd; continue }
            var words = chunks[ci] ?? [UInt64](repeating: 0, count: Self.wordsPerChunk)
            var b = Int(n & ((1 << Self.chunkBitsLog2) - 1))
            let bEnd = b + Int(chunkEnd - n)
            while b < bEnd {
                let w = b >> 6
                let lo = b & 63
                let hi = min(64, lo + (bEnd - b))
                let mask: UInt64 = hi - lo == 64 ? .max : ((1 << UInt64(hi - lo)) - 1) << UInt64(lo)
                if value { words[w] |= mask } else { words[w] &= ~mask }
                b += hi - lo
            }
            if value || words.contains(where: { $0 != 0 }) { chunks[ci] = words } else { chunks[ci] = nil }
            n = chunkEnd
        }
    }

    /// Number of dirty bits.
    public var dirtyBitCount: UInt64 {
        chunks.values.reduce(0) { $0 + $1.reduce(0) { $0 + UInt64($1.nonzeroBitCount) } }
    }

    /// Guest bytes covered by dirty granules (the last granule counts only up to the disk end).
    public var dirtyBytes: UInt64 {
        var total: UInt64 = 0
        forEachDirtyExtent { total += $1 }
        return total
    }

    /// Calls `body(offset, length)` for each run of dirty granules, in order, merged,
    /// clipped to the disk size.
    public func forEachDirtyExtent(_ body: (UInt64, UInt64) throws -> Void) rethrows {
        var runStart: UInt64?
        var runEnd: UInt64 = 0
        for ci in chunks.keys.sorted() {
            let words = chunks[ci]!
            let base = ci << Self.chunkBitsLog2
            for (wi, w0) in words.enumerated() where w0 != 0 {
                var w = w0
                while w != 0 {
                    let lo = UInt64(w.trailingZeroBitCount)
                    let ones = UInt64((~(w >> lo)).trailingZeroBitCount)
                    let first = base + UInt64(wi) * 64 + lo
                    if runStart != nil, first == runEnd {
                        runEnd = first + ones
                    } else {
                        if let s = runStart { try body(s * granularity, min(size, runEnd * granularity) - s * granularity) }
                        runStart = first
                        runEnd = first + ones
                    }
                    w = ones + lo >= 64 ? 0 : w & ~(((1 << ones) - 1) << lo)
                }
            }
        }
        if let s = runStart { try body(s * granularity, min(size, runEnd * granularity) - s * granularity) }
    }

    /// ORs `other` into this bitmap; granularities may differ (a dirty granule of
    /// `other` dirties every granule of this bitmap it overlaps).
    public mutating func merge(_ other: DirtyBitmap) {
        if other.granularity == granularity {
            for (ci, words) in other.chunks {
                var mine = chunks[ci] ?? [UInt64](repeating: 0, count: Self.wordsPerChunk)
                for i in 0..<words.count { mine[i] |= words[i] }
                chunks[ci] = mine
            }
            // Bits past our size (other bitmap larger) must stay clear.
            if other.size > size { setBits(bitCount, UInt64.max, to: false) }
            return
        }
        other.forEachDirtyExtent { set($0, $1) }
    }

    /// Changes the covered size; bits past a smaller size are dropped.
    public mutating func resize(_ newSize: UInt64) {
        if newSize < size {
            let keep = newSize == 0 ? 0 : (newSize - 1) / granularity + 1
            size = newSize
            for ci in chunks.keys where (ci << Self.chunkBitsLog2) >= keep { chunks[ci] = nil }
            if keep & ((1 << Self.chunkBitsLog2) - 1) != 0, var words = chunks[keep >> Self.chunkBitsLog2] {
                let inChunk = Int(keep & ((1 << Self.chunkBitsLog2) - 1))
                for b in inChunk..<(Self.wordsPerChunk * 64) where words[b >> 6] & (1 << UInt64(b & 63)) != 0 {
                    words[b >> 6] &= ~(1 << UInt64(b & 63))
                }
                chunks[keep >> Self.chunkBitsLog2] = words.contains { $0 != 0 } ? words : nil
            }
        } else {
            size = newSize
        }
    }

    // MARK: On-disk form (bit n = bit n%8 of byte n/8, i.e. little-endian 64-bit words)

    /// Sets the bits serialized in `bytes`, which start at byte `byteOffset` of the
    /// bitmap (both multiples of 8). Bits past `bitCount` are ignored.
    public mutating func load(bytes: UnsafeRawBufferPointer, atByte byteOffset: UInt64) {
        precondition(byteOffset % 8 == 0 && bytes.count % 8 == 0)
        let firstWord = byteOffset / 8
        let n = bytes.count / 8
        let bitCount = self.bitCount
        var i = 0
        // One chunk at a time: a lookup per chunk, words updated in place.
        while i < n {
            let wordIndex = firstWord + UInt64(i)
            guard wordIndex * 64 < bitCount else { break }
            let ci = (wordIndex * 64) >> Self.chunkBitsLog2
            let chunkEnd = ((ci + 1) << Self.chunkBitsLog2) / 64
            let m = min(n, i + Int(chunkEnd - wordIndex))
            var j = i
            while j < m && bytes.loadUnaligned(fromByteOffset: j * 8, as: UInt64.self) == 0 { j += 1 }
            if j < m {
                Self.update(&chunks[ci, default: Self.emptyChunk]) { words in
                    for k in j..<m {
                        var v = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: k * 8, as: UInt64.self))
                        if v == 0 { continue }
                        let firstBit = (firstWord + UInt64(k)) * 64
                        guard firstBit < bitCount else { break }
                        if bitCount - firstBit < 64 { v &= (1 << (bitCount - firstBit)) - 1 }
                        words[Int((firstWord + UInt64(k)) & UInt64(Self.wordsPerChunk - 1))] |= v
                    }
                }
            }
            i = m
        }
        // A chunk made only of bits past the end stays all zero: drop it.
        if let last = chunks[(bitCount &- 1) >> Self.chunkBitsLog2], last.allSatisfy({ $0 == 0 }) {
            chunks[(bitCount &- 1) >> Self.chunkBitsLog2] = nil
        }
    }

    static let emptyChunk = [UInt64](repeating: 0, count: wordsPerChunk)

    private static func update(_ words: inout [UInt64], _ body: (inout [UInt64]) -> Void) { body(&words) }

    /// The serialized bytes [byteOffset, byteOffset + count) (multiples of 8); nil when all zero.
    public func bytes(atByte byteOffset: UInt64, count: Int) -> [UInt8]? {
        precondition(byteOffset % 8 == 0 && count % 8 == 0)
        let firstWord = byteOffset / 8
        let n = count / 8
        // Cheap emptiness test first: most clusters of a sparse bitmap have no chunk.
        var i = 0
        var present: [(Int, Int, [UInt64])] = []
        while i < n {
            let wordIndex = firstWord + UInt64(i)
            let ci = (wordIndex * 64) >> Self.chunkBitsLog2
            let chunkEnd = ((ci + 1) << Self.chunkBitsLog2) / 64
            let m = min(n, i + Int(chunkEnd - wordIndex))
            if let words = chunks[ci] { present.append((i, m, words)) }
            i = m
        }
        guard !present.isEmpty else { return nil }
        var out = [UInt8](repeating: 0, count: count)
        var any = false
        out.withUnsafeMutableBytes { o in
            for (a, b, words) in present {
                for k in a..<b {
                    let w = words[Int((firstWord + UInt64(k)) & UInt64(Self.wordsPerChunk - 1))]
                    if w != 0 {
                        o.storeBytes(of: w.littleEndian, toByteOffset: k * 8, as: UInt64.self)
                        any = true
                    }
                }
            }
        }
        return any ? out : nil
    }
}
