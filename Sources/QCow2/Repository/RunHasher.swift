#if canImport(Glibc)
import Glibc
#endif
import Dispatch

/// SHA-256 of each of a point's data runs, on every core: the calling thread reads a
/// batch of runs (each into its own buffer) while the previous batch is hashed, one run
/// per worker. SHA-256 is slower than reading from the page cache, so hashing one run
/// after another on one core would set the pace. Workers only hash: every file access
/// stays on the calling thread (and in its fault-injection scope). Memory: two batches.
enum RunHasher {
    static let batch = 4

    static func digests(_ q: QCow2Image, ranges: [(UInt64, UInt64)]) throws -> [String] {
        _ = try SHA256()  // libcrypto present: a worker cannot throw
        let slot = Int(PointDigest.maxRun)
        let buffers = (0..<2).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: slot * batch, alignment: 4096) }
        let groups = [DispatchGroup(), DispatchGroup()]
        defer {
            groups.forEach { $0.wait() }
            buffers.forEach { $0.deallocate() }
        }
        var sums = [String](repeating: "", count: ranges.count)
        try sums.withUnsafeMutableBufferPointer { out in
            defer { groups.forEach { $0.wait() } }  // no worker outlives `out`
            var start = 0
            var set = 0
            while start < ranges.count {
                let end = min(ranges.count, start + batch)
                groups[set].wait()  // the batch before last, hashed from this buffer
                var pieces: [UnsafeRawBufferPointer] = []
                for (i, (a, n)) in ranges[start..<end].enumerated() {
                    let piece = UnsafeMutableRawBufferPointer(rebasing: buffers[set][(i * slot)..<(i * slot + Int(n))])
                    try q.read(into: piece, at: a)
                    pieces.append(UnsafeRawBufferPointer(piece))
                }
                for (i, piece) in pieces.enumerated() {
                    // Each worker writes its own slot only.
                    let shared = UncheckedSendable((out, start + i, piece))
                    DispatchQueue.global().async(group: groups[set]) {
                        let (out, index, piece) = shared.value
                        guard var h = try? SHA256() else { return }
                        h.update(piece)
                        out[index] = h.finish()
                    }
                }
                start = end
                set ^= 1
            }
        }
        return sums
    }
}
