#if canImport(Glibc)
import Glibc
#endif
import Dispatch

/// SHA-256 of each of a point's data runs, on every core. The runs stored as plain data
/// clusters inside the file are hashed straight from a read-only mapping of the file
/// (`MappedFile`: no copy out of the page cache; the calling thread hashes too); the others
/// (compressed clusters, data past the end of a damaged file, or no mapping) are read
/// through the image. SHA-256 is slower than reading from the page cache, so the hashing
/// sets the pace: it is spread over every core, one run per task.
enum RunHasher {
    static let batch = 4

    static func digests(_ q: QCow2Image, ranges: [(UInt64, UInt64)]) throws -> [String] {
        _ = try SHA256()  // libcrypto present: a worker cannot throw
        var sums = [String](repeating: "", count: ranges.count)
        var unmapped = Array(ranges.indices)
        let size = try q.file.size()
        if !ranges.isEmpty, let map = MappedFile(q.file, size: size) {
            let pieces = try ranges.map { try hostPieces(q, $0.0, $0.1, fileSize: UInt64(map.size)) }
            unmapped = ranges.indices.filter { pieces[$0] == nil }
            hashMapped(map, pieces, into: &sums)
            if map.shrank {
                throw QCow2Error.malformed(path: q.path, field: "file size", detail: "the file shrank while it was read")
            }
        }
        let read = try readAndHash(q, ranges: unmapped.map { ranges[$0] })
        for (i, sum) in zip(unmapped, read) { sums[i] = sum }
        return sums
    }

    /// Where run [a, a+n) lies in the file: its pieces (host offset, length), merged where
    /// contiguous; nil unless it is all plain data inside the file's first `fileSize` bytes.
    static func hostPieces(_ q: QCow2Image, _ a: UInt64, _ n: UInt64, fileSize: UInt64) throws -> [(UInt64, Int)]? {
        var out: [(UInt64, Int)] = []
        var pos = a
        while pos < a + n {
            let e = try q.layerExtent(at: pos, maxLength: a + n - pos)
            guard case .normal(let host) = e.descriptor, e.length > 0, host <= fileSize, e.length <= fileSize - host else { return nil }
            if let last = out.last, last.0 + UInt64(last.1) == host { out[out.count - 1].1 += Int(e.length) } else { out.append((host, Int(e.length))) }
            pos += e.length
        }
        return out
    }

    /// The mapped runs, one task each, on every core (the calling thread included).
    static func hashMapped(_ map: MappedFile, _ pieces: [[(UInt64, Int)]?], into sums: inout [String]) {
        sums.withUnsafeMutableBufferPointer { out in
            let shared = UncheckedSendable((out, pieces, map))
            DispatchQueue.concurrentPerform(iterations: pieces.count) { i in
                let (out, pieces, map) = shared.value
                guard let run = pieces[i], var h = try? SHA256() else { return }
                for (host, n) in run {
                    h.update(map.bytes(host, n))
                    map.drop(host, n)
                }
                out[i] = h.finish()  // each task writes its own slot only
            }
        }
    }

    /// The calling thread reads a batch of runs (each into its own buffer) while the
    /// previous batch is hashed, one run per worker. Every file access stays on the calling
    /// thread (and in its fault-injection scope). Memory: two batches.
    static func readAndHash(_ q: QCow2Image, ranges: [(UInt64, UInt64)]) throws -> [String] {
        guard !ranges.isEmpty else { return [] }
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
