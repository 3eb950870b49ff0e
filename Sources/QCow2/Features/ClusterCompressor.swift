import CZlib
import CZstd

/// Compresses whole clusters the way QEMU does, reusing its codec state from one cluster
/// to the next (one per thread): raw deflate with a 4 KiB window (windowBits -12,
/// memLevel 9, the default level 6, the default strategy), or one zstd frame at level 3
/// with the content size and no checksum. A stream QEMU would not store compressed (not
/// smaller than the cluster) is reported as nil, and the cluster is written as it is.
final class ClusterCompressor {
    let type: CompressionType
    let clusterSize: Int
    /// zlib keeps the stream's address from deflateInit2_ to deflateEnd: a stable one.
    private let deflater: UnsafeMutablePointer<z_stream>?
    private let zstd: OpaquePointer?

    init?(_ type: CompressionType, clusterSize: Int) {
        self.type = type
        self.clusterSize = clusterSize
        switch type {
        case .zlib:
            let p = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
            p.initialize(to: z_stream())
            guard deflateInit2_(p, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY,
                                ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
                p.deinitialize(count: 1)
                p.deallocate()
                return nil
            }
            deflater = p
            zstd = nil
        case .zstd:
            guard let ctx = ZSTD_createCCtx() else { return nil }
            deflater = nil
            zstd = ctx
        }
    }

    deinit {
        if let p = deflater {
            deflateEnd(p)
            p.deinitialize(count: 1)
            p.deallocate()
        }
        if let ctx = zstd { ZSTD_freeCCtx(ctx) }
    }

    /// Room `compress` needs for one cluster's stream.
    var outputCapacity: Int { type == .zstd ? ZSTD_compressBound(clusterSize) : clusterSize }

    /// Compresses `input` (one whole cluster) into `out` (at least `outputCapacity`
    /// bytes). Returns the stream's length, or nil when it would not be smaller than the input.
    func compress(_ input: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) -> Int? {
        guard let inBase = input.baseAddress, let outBase = out.baseAddress, input.count > 0 else { return nil }
        if let strm = deflater {
            // The same stream as a fresh deflateInit2_: deflateReset clears all history.
            guard deflateReset(strm) == Z_OK else { return nil }
            strm.pointee.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: Bytef.self))
            strm.pointee.avail_in = uInt(input.count)
            strm.pointee.next_out = outBase.assumingMemoryBound(to: Bytef.self)
            let room = min(out.count, input.count - 1)
            strm.pointee.avail_out = uInt(room)
            guard deflate(strm, Z_FINISH) == Z_STREAM_END else { return nil }
            return room - Int(strm.pointee.avail_out)
        }
        guard let ctx = zstd else { return nil }
        let n = ZSTD_compressCCtx(ctx, outBase, out.count, inBase, input.count, 3)
        guard ZSTD_isError(n) == 0, n < input.count else { return nil }
        return n
    }
}
