import Dispatch
#if canImport(Glibc)
import Glibc
#endif

/// The compressing middle of `convert -c` and `backup -c`: a fixed ring of chunk buffers.
/// The caller's thread reads a chunk of the source into a free slot and hands it over; its
/// clusters are checked for zeros and compressed on every core while the caller reads the
/// next chunks; the caller then writes the finished chunks in guest order. Memory is the
/// ring (input and output buffers, and one codec state per worker and slot), allocated
/// once and reused; compressors never touch a file, so every read and write (and a fault
/// injected into one) stays on the caller's thread.
final class CompressionPipeline {
    /// One chunk of whole clusters (the last one may end with the disk).
    final class Chunk {
        let clusterSize: Int
        let input: UnsafeMutableRawBufferPointer
        let output: UnsafeMutableRawBufferPointer
        /// Per cluster: a stream's length, `Self.incompressible` or `Self.zero`.
        let lengths: UnsafeMutableBufferPointer<Int>
        /// Per cluster: where its stream starts in `output` (`compact` moves them together).
        let starts: UnsafeMutableBufferPointer<Int>
        let compressors: [ClusterCompressor]
        let group = DispatchGroup()
        fileprivate(set) var guest: UInt64 = 0
        fileprivate(set) var count = 0
        fileprivate var pending = false
        static let incompressible = -1
        static let zero = -2

        fileprivate init(type: CompressionType, encoder: ZlibEncoder, clusterSize cs: Int, bytes: Int, workers: Int, path: String) throws {
            clusterSize = cs
            if type == .zlib && encoder == .igzip { _ = try LibIsal.shared.get() }  // its own error: libisal missing
            compressors = try (0..<workers).map { _ in
                guard let c = ClusterCompressor(type, encoder: encoder, clusterSize: cs) else {
                    throw QCow2Error.unsupported(path: path, detail: "the \(type.name) compressor could not start")
                }
                return c
            }
            let stride = compressors[0].outputCapacity
            input = .allocate(byteCount: bytes, alignment: 4096)
            output = .allocate(byteCount: bytes / cs * stride, alignment: 64)
            lengths = .allocate(capacity: bytes / cs)
            starts = .allocate(capacity: bytes / cs)
        }

        deinit {
            input.deallocate()
            output.deallocate()
            lengths.deallocate()
            starts.deallocate()
        }

        var clusters: Int { (count + clusterSize - 1) / clusterSize }
        private var stride: Int { output.count / lengths.count }

        /// Cluster `i`'s guest bytes (the last one: up to the end of the disk).
        func data(_ i: Int) -> UnsafeRawBufferPointer {
            UnsafeRawBufferPointer(rebasing: input[(i * clusterSize)..<min(count, (i + 1) * clusterSize)])
        }

        /// Cluster `i`'s compressed stream; nil when it is stored as it is (or is zero).
        func stream(_ i: Int) -> UnsafeRawBufferPointer? {
            let n = lengths[i]
            return n >= 0 ? UnsafeRawBufferPointer(rebasing: output[starts[i]..<(starts[i] + n)]) : nil
        }

        /// Moves the streams together, in cluster order, so that streams the target
        /// places one after the other go to the file with one write. Each stream moves
        /// towards the start of `output` only (`stride` is at least its length).
        fileprivate func compact() {
            guard let base = output.baseAddress else { return }
            var at = 0
            for i in 0..<clusters where lengths[i] >= 0 {
                if at != i * stride { memmove(base + at, base + i * stride, lengths[i]) }
                starts[i] = at
                at += lengths[i]
            }
        }

        func isZero(_ i: Int) -> Bool { lengths[i] == Self.zero }

        /// Worker `w` of `workers`: every `workers`-th cluster from `w`.
        fileprivate func compress(worker w: Int, of workers: Int, detectZeros: Bool) {
            let cs = clusterSize
            var i = w
            while i < clusters {
                let whole = UnsafeRawBufferPointer(rebasing: input[(i * cs)..<((i + 1) * cs)])
                if detectZeros && CopyEngine.allZero(data(i), 0, data(i).count) {
                    lengths[i] = Self.zero
                } else {
                    let out = UnsafeMutableRawBufferPointer(rebasing: output[(i * stride)..<((i + 1) * stride)])
                    lengths[i] = compressors[w].compress(whole, into: out) ?? Self.incompressible
                }
                i += workers
            }
        }
    }

    let type: CompressionType
    let encoder: ZlibEncoder
    let clusterSize: Int
    let chunkBytes: Int
    let detectZeros: Bool
    private let workers: Int
    private let ring: [Chunk]

    /// Slots in the ring: one being written, one being read, the rest compressing.
    static let slots = 4

    /// `path`: the target, named when a compressor cannot start.
    init(type: CompressionType, encoder: ZlibEncoder = .igzip, clusterSize cs: Int, detectZeros: Bool, path: String) throws {
        let cores = max(1, min(64, sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        // 512 KiB per core and chunk (at least a cluster, at most 8 MiB): enough whole
        // clusters in flight to keep every core compressing while one chunk is written.
        let bytes = max(cs, min(8 << 20, cores * (512 << 10)) / cs * cs)
        self.type = type
        self.encoder = encoder
        clusterSize = cs
        chunkBytes = bytes
        self.detectZeros = detectZeros
        workers = min(cores, bytes / cs)
        ring = try (0..<Self.slots).map { _ in
            try Chunk(type: type, encoder: encoder, clusterSize: cs, bytes: bytes, workers: min(cores, bytes / cs), path: path)
        }
    }

    /// Copies guest [start, end) (`start` cluster-aligned): `read` fills each chunk on the
    /// caller's thread, and `write` takes the compressed chunks in guest order, also on the
    /// caller's thread. `beforeRead` may stop the run (by throwing). On any error, the
    /// workers still running are waited for before it is rethrown.
    func run(_ start: UInt64, _ end: UInt64, beforeRead: () throws -> Void,
             read: (UnsafeMutableRawBufferPointer, UInt64) throws -> Void, write: (Chunk) throws -> Void) throws {
        var next = 0
        defer { for c in ring where c.pending { c.group.wait(); c.pending = false } }
        var pos = start
        while pos < end {
            let slot = ring[next]
            try finish(slot, write)
            try beforeRead()
            let n = Int(min(UInt64(chunkBytes), end - pos))
            try read(UnsafeMutableRawBufferPointer(rebasing: slot.input[0..<n]), pos)
            // A last partial cluster is compressed as a whole one, zero-padded.
            let padded = (n + clusterSize - 1) / clusterSize * clusterSize
            if padded > n { UnsafeMutableRawBufferPointer(rebasing: slot.input[n..<padded]).initializeMemory(as: UInt8.self, repeating: 0) }
            slot.guest = pos
            slot.count = n
            submit(slot)
            pos += UInt64(n)
            next = (next + 1) % ring.count
        }
        for k in 0..<ring.count { try finish(ring[(next + k) % ring.count], write) }
    }

    private func finish(_ slot: Chunk, _ write: (Chunk) throws -> Void) throws {
        guard slot.pending else { return }
        slot.group.wait()
        slot.pending = false
        slot.compact()
        try write(slot)
    }

    private func submit(_ slot: Chunk) {
        slot.pending = true
        let n = min(workers, slot.clusters)
        let zeros = detectZeros
        for w in 0..<n {
            let box = UncheckedSendable(slot)
            DispatchQueue.global().async(group: slot.group) { box.value.compress(worker: w, of: n, detectZeros: zeros) }
        }
    }
}

/// Hands a value to worker threads that touch disjoint parts of it.
struct UncheckedSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
