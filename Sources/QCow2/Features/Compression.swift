import CZlib
import CZstd

/// Decompression of one compressed cluster (spec "Compressed Clusters Descriptor").
public enum CompressionType: UInt8, Sendable {
    case zlib = 0
    case zstd = 1

    public var name: String { self == .zlib ? "zlib" : "zstd" }
}

enum Codec {
    /// Compresses one cluster; a final partial cluster is zero-padded to a whole one first.
    /// Nil: it does not compress (or the codec could not start).
    static func compressCluster(_ type: CompressionType, _ data: UnsafeRawBufferPointer, clusterSize cs: Int,
                                encoder: ZlibEncoder = .igzip) -> [UInt8]? {
        // Without libisal, zlib's encoder (the same data to every reader).
        guard let compressor = ClusterCompressor(type, encoder: encoder, clusterSize: cs)
                ?? ClusterCompressor(type, encoder: .qemu, clusterSize: cs) else { return nil }
        var cluster = [UInt8](repeating: 0, count: cs)
        cluster.withUnsafeMutableBytes { $0.copyMemory(from: data) }
        var out = [UInt8](repeating: 0, count: compressor.outputCapacity)
        let n = cluster.withUnsafeBytes { input in out.withUnsafeMutableBytes { compressor.compress(input, into: $0) } }
        return n.map { Array(out[0..<$0]) }
    }

    /// Decodes `input` into exactly `output.count` bytes. Returns false when the
    /// stream is invalid or ends early.
    static func decompress(_ type: CompressionType, input: UnsafeRawBufferPointer,
                           output: UnsafeMutableRawBufferPointer) -> Bool {
        switch type {
        case .zlib: return inflateRaw(input: input, output: output)
        case .zstd: return zstdFrame(input: input, output: output)
        }
    }

    /// Raw deflate (no zlib header). A 32 KiB window accepts QEMU's 4 KiB-window streams
    /// and the larger-window streams QEMU itself also reads.
    static func inflateRaw(input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let inBase = input.baseAddress, let outBase = output.baseAddress else { return false }
        let strm = ZStream()
        guard inflateInit2_(strm.pointer, -15, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return false }
        defer { inflateEnd(strm.pointer) }
        strm.pointer.pointee.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: Bytef.self))
        strm.pointer.pointee.avail_in = uInt(input.count)
        strm.pointer.pointee.next_out = outBase.assumingMemoryBound(to: Bytef.self)
        strm.pointer.pointee.avail_out = uInt(output.count)
        let r = inflate(strm.pointer, Z_FINISH)
        return (r == Z_STREAM_END || r == Z_BUF_ERROR) && strm.pointer.pointee.avail_out == 0
    }

    /// One zstd frame; bytes after it (padding or the next cluster's frame) are ignored.
    static func zstdFrame(input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let inBase = input.baseAddress, let outBase = output.baseAddress else { return false }
        guard let ctx = ZSTD_createDCtx() else { return false }
        defer { ZSTD_freeDCtx(ctx) }
        var inb = ZSTD_inBuffer(src: inBase, size: input.count, pos: 0)
        var outb = ZSTD_outBuffer(dst: outBase, size: output.count, pos: 0)
        while outb.pos < outb.size {
            let before = (inb.pos, outb.pos)
            let r = ZSTD_decompressStream(ctx, &outb, &inb)
            if ZSTD_isError(r) != 0 { return false }
            if r == 0 { break }  // frame complete
            if before == (inb.pos, outb.pos) { return false }  // no progress: truncated input
        }
        return outb.pos == outb.size
    }
}

/// A z_stream at a fixed address: zlib stores the stream's address at init and checks it
/// on every call, and `&variable` is only valid for the one call it is passed to.
private final class ZStream {
    let pointer = UnsafeMutablePointer<z_stream>.allocate(capacity: 1)
    init() { pointer.initialize(to: z_stream()) }
    deinit {
        pointer.deinitialize(count: 1)
        pointer.deallocate()
    }
}
