import CIsal
import CZlib
import CZstd

/// Compresses whole clusters into the streams QEMU reads, reusing its codec state from one
/// cluster to the next (one per thread). zlib type: raw deflate with a 4 KiB window (QEMU
/// inflates with windowBits -12, so no match may reach further back), made by igzip at
/// level 3 or, as QEMU makes it, by zlib at level 6, memLevel 9, the default strategy
/// (`ZlibEncoder`). zstd type: one frame at level 3 with the content size and no checksum,
/// as QEMU writes it. A stream QEMU would not store compressed (not smaller than the
/// cluster) is reported as nil, and the cluster is written as it is.
final class ClusterCompressor {
    let type: CompressionType
    let clusterSize: Int
    /// zlib keeps the stream's address from deflateInit2_ to deflateEnd: a stable one.
    private let deflater: UnsafeMutablePointer<z_stream>?
    /// igzip's stream and its level-3 working buffer.
    private let igzip: UnsafeMutablePointer<isal_zstream>?
    private let igzipBuffer: UnsafeMutableRawBufferPointer?
    private let isal: LibIsal?
    private let zstd: OpaquePointer?

    /// The largest match distance of a zlib-type stream (QEMU's windowBits -12).
    static let windowBits = 12

    /// Nil when the codec cannot start (for igzip: libisal missing, see `LibIsal.shared`).
    init?(_ type: CompressionType, encoder: ZlibEncoder = .igzip, clusterSize: Int) {
        self.type = type
        self.clusterSize = clusterSize
        var deflater: UnsafeMutablePointer<z_stream>?
        var igzip: UnsafeMutablePointer<isal_zstream>?
        var igzipBuffer: UnsafeMutableRawBufferPointer?
        var zstd: OpaquePointer?
        var isal: LibIsal?
        switch (type, encoder) {
        case (.zlib, .igzip):
            guard let api = try? LibIsal.shared.get() else { return nil }
            isal = api
            let p = UnsafeMutablePointer<isal_zstream>.allocate(capacity: 1)
            p.initialize(to: isal_zstream())
            igzip = p
            igzipBuffer = .allocate(byteCount: Int(qimg_isal_level3_buffer), alignment: 64)
        case (.zlib, .qemu):
            let p = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
            p.initialize(to: z_stream())
            guard deflateInit2_(p, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -Int32(Self.windowBits), 9, Z_DEFAULT_STRATEGY,
                                ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
                p.deinitialize(count: 1)
                p.deallocate()
                return nil
            }
            deflater = p
        case (.zstd, _):
            guard let ctx = ZSTD_createCCtx() else { return nil }
            zstd = ctx
        }
        self.deflater = deflater
        self.igzip = igzip
        self.igzipBuffer = igzipBuffer
        self.zstd = zstd
        self.isal = isal
    }

    deinit {
        if let p = deflater {
            deflateEnd(p)
            p.deinitialize(count: 1)
            p.deallocate()
        }
        if let p = igzip {
            p.deinitialize(count: 1)
            p.deallocate()
        }
        igzipBuffer?.deallocate()
        if let ctx = zstd { ZSTD_freeCCtx(ctx) }
    }

    /// Room `compress` needs for one cluster's stream.
    var outputCapacity: Int { type == .zstd ? ZSTD_compressBound(clusterSize) : clusterSize }

    /// Compresses `input` (one whole cluster) into `out` (at least `outputCapacity`
    /// bytes). Returns the stream's length, or nil when it would not be smaller than the input.
    func compress(_ input: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) -> Int? {
        guard let inBase = input.baseAddress, let outBase = out.baseAddress, input.count > 0 else { return nil }
        let room = min(out.count, input.count - 1)
        if let strm = igzip, let buffer = igzipBuffer?.baseAddress, let isal {
            // A whole stream in one call, from a fresh state (no history from the last cluster).
            isal.statelessInit(strm)
            strm.pointee.level = 3
            strm.pointee.level_buf = buffer.assumingMemoryBound(to: UInt8.self)
            strm.pointee.level_buf_size = qimg_isal_level3_buffer
            strm.pointee.hist_bits = UInt16(Self.windowBits)
            strm.pointee.gzip_flag = UInt16(IGZIP_DEFLATE)
            strm.pointee.end_of_stream = 1
            strm.pointee.flush = UInt16(NO_FLUSH)
            strm.pointee.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: UInt8.self))
            strm.pointee.avail_in = UInt32(input.count)
            strm.pointee.next_out = outBase.assumingMemoryBound(to: UInt8.self)
            strm.pointee.avail_out = UInt32(room)
            // STATELESS_OVERFLOW: the stream does not fit in `room`, so it is not smaller.
            guard isal.stateless(strm) == COMP_OK, strm.pointee.avail_in == 0 else { return nil }
            return room - Int(strm.pointee.avail_out)
        }
        if let strm = deflater {
            // The same stream as a fresh deflateInit2_: deflateReset clears all history.
            guard deflateReset(strm) == Z_OK else { return nil }
            strm.pointee.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: Bytef.self))
            strm.pointee.avail_in = uInt(input.count)
            strm.pointee.next_out = outBase.assumingMemoryBound(to: Bytef.self)
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
