import CZlib
import CZstd
import Dispatch

/// Decompression of one compressed cluster (spec "Compressed Clusters Descriptor").
public enum CompressionType: UInt8, Sendable {
    case zlib = 0
    case zstd = 1

    public var name: String { self == .zlib ? "zlib" : "zstd" }
}

enum Codec {
    /// Compresses one cluster; a final partial cluster is zero-padded to a whole one first.
    static func compressCluster(_ type: CompressionType, _ data: UnsafeRawBufferPointer, clusterSize cs: Int) -> [UInt8]? {
        if data.count == cs { return compress(type, input: data) }
        var cluster = [UInt8](repeating: 0, count: cs)
        cluster.withUnsafeMutableBytes { $0.copyMemory(from: data) }
        return cluster.withUnsafeBytes { compress(type, input: $0) }
    }

    /// Compresses the consecutive clusters of `data` on every core (nil: does not compress).
    static func compressClusters(_ type: CompressionType, data: UnsafeRawBufferPointer, clusterSize cs: Int) -> [[UInt8]?] {
        let count = (data.count + cs - 1) / cs
        var out = [[UInt8]?](repeating: nil, count: count)
        if count == 1 {
            out[0] = compressCluster(type, data, clusterSize: cs)
            return out
        }
        out.withUnsafeMutableBufferPointer { results in
            // Each iteration writes its own slot only.
            let shared = UncheckedSendable((results, data))
            DispatchQueue.concurrentPerform(iterations: count) { i in
                let (results, data) = shared.value
                let part = UnsafeRawBufferPointer(rebasing: data[(i * cs)..<min(data.count, (i + 1) * cs)])
                results[i] = compressCluster(type, part, clusterSize: cs)
            }
        }
        return out
    }

    /// Compresses one cluster the way QEMU does: raw deflate with a 4 KiB window
    /// (windowBits -12, memLevel 9, default level), or one zstd frame with the content
    /// size and no checksum. Returns nil when the result would not be smaller than the input.
    static func compress(_ type: CompressionType, input: UnsafeRawBufferPointer) -> [UInt8]? {
        guard let inBase = input.baseAddress, input.count > 0 else { return nil }
        switch type {
        case .zlib:
            // zlib keeps the stream's address (deflateInit2_ to deflateEnd): a stable one.
            let strm = ZStream()
            guard deflateInit2_(strm.pointer, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY,
                                ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return nil }
            defer { deflateEnd(strm.pointer) }
            var out = [UInt8](repeating: 0, count: input.count - 1)
            let produced: Int? = out.withUnsafeMutableBytes { o in
                strm.pointer.pointee.next_in = UnsafeMutablePointer(mutating: inBase.assumingMemoryBound(to: Bytef.self))
                strm.pointer.pointee.avail_in = uInt(input.count)
                strm.pointer.pointee.next_out = o.baseAddress!.assumingMemoryBound(to: Bytef.self)
                strm.pointer.pointee.avail_out = uInt(o.count)
                let r = deflate(strm.pointer, Z_FINISH)
                return r == Z_STREAM_END ? o.count - Int(strm.pointer.pointee.avail_out) : nil
            }
            guard let n = produced else { return nil }
            return Array(out[0..<n])
        case .zstd:
            let bound = ZSTD_compressBound(input.count)
            var out = [UInt8](repeating: 0, count: bound)
            let n = out.withUnsafeMutableBytes { o in
                ZSTD_compress(o.baseAddress, o.count, inBase, input.count, 3)
            }
            guard ZSTD_isError(n) == 0, n < input.count else { return nil }
            return Array(out[0..<n])
        }
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

/// Hands values to worker threads that touch disjoint parts of them.
struct UncheckedSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
