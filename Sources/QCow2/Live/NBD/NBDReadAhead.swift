/// Overlapped reads for a copy from an NBD export: told the ranges the copy will read,
/// in order, it keeps up to `depth` reads of at most `pieceSize` bytes in flight on the
/// client's connection (libnbd's aio requests), so that the server reads and sends the
/// next pieces while the copy writes the current one. Memory is `depth` buffers, owned by
/// the client (freed after its connection is closed, so a request still in flight never
/// writes into freed memory). A read that does not continue where the last one ended
/// drops what is in flight and starts again there; one outside the ranges is not served.
final class NBDReadAhead {
    private struct Piece {
        var offset: UInt64
        var length: Int
        var slot: Int
        var cookie: Int64
        var used = 0
        var arrived = false
    }

    let client: NBDClient
    let pieceSize: Int
    private let slots: [UnsafeMutableRawPointer]
    private var free: [Int]
    /// Requests in flight or not yet consumed, in guest order.
    private var pending: [Piece] = []
    private let ranges: [(UInt64, UInt64)]
    /// The next range to request from, and the next offset in it.
    private var next = 0
    private var nextPos: UInt64 = 0

    /// `ranges`: sorted, non-overlapping (offset, length) runs the copy reads in order.
    init(_ client: NBDClient, ranges: [(UInt64, UInt64)], depth: Int = 8, pieceSize: Int = 2 << 20) {
        self.client = client
        self.pieceSize = max(1, min(pieceSize, client.maxRead))
        slots = (0..<max(1, depth)).map { _ in client.makeReadBuffer(byteCount: min(pieceSize, client.maxRead)) }
        free = Array(slots.indices.reversed())
        self.ranges = ranges.filter { $0.1 > 0 }
        nextPos = self.ranges.first?.0 ?? 0
    }

    /// Where the next in-order read starts (nil: nothing left to read ahead).
    private var expected: UInt64? {
        if let p = pending.first { return p.offset + UInt64(p.used) }
        return next < ranges.count ? nextPos : nil
    }

    /// Fills the start of `buffer` with the export's bytes at `offset` from the reads in
    /// flight; returns how many bytes it filled (0: `offset` is not in the ranges).
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        guard let base = buffer.baseAddress else { return 0 }
        if expected != offset { restart(at: offset) }
        try fill()
        var done = 0
        while done < buffer.count, var p = pending.first, p.offset + UInt64(p.used) == offset + UInt64(done) {
            if !p.arrived {
                try client.wait(for: p.cookie, count: p.length, at: p.offset)
                p.arrived = true
            }
            let n = min(p.length - p.used, buffer.count - done)
            (base + done).copyMemory(from: slots[p.slot] + p.used, byteCount: n)
            done += n
            p.used += n
            if p.used == p.length {
                pending.removeFirst()
                free.append(p.slot)
                try fill()
            } else {
                pending[0] = p
            }
        }
        return done
    }

    /// Sends reads for the next pieces of the ranges while a buffer is free.
    private func fill() throws {
        while next < ranges.count, let slot = free.last {
            let end = ranges[next].0 + ranges[next].1
            let n = Int(min(UInt64(pieceSize), end - nextPos))
            let cookie = try client.startRead(into: slots[slot], count: n, at: nextPos)
            free.removeLast()
            pending.append(Piece(offset: nextPos, length: n, slot: slot, cookie: cookie))
            nextPos += UInt64(n)
            if nextPos == end {
                next += 1
                if next < ranges.count { nextPos = ranges[next].0 }
            }
        }
    }

    /// Drops the reads in flight (waiting for them: their buffers are reused) and goes on
    /// from `offset`, or from the first range after it.
    private func restart(at offset: UInt64) {
        for p in pending {
            if !p.arrived { try? client.wait(for: p.cookie, count: p.length, at: p.offset) }
            free.append(p.slot)
        }
        pending.removeAll()
        next = ranges.firstIndex { $0.0 + $0.1 > offset } ?? ranges.count
        if next < ranges.count { nextPos = max(offset, ranges[next].0) }
    }
}
