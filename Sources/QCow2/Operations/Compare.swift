#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What `qemu-img compare` concludes about two images.
public struct CompareReport: Equatable, Sendable {
    public enum Verdict: Equatable, Sendable {
        /// Same guest content (and, in strict mode, same block status and size).
        case identical
        /// The first 512-byte block (counted from the start of the chunk being compared,
        /// as qemu-img does) that differs starts at this guest offset.
        case contentMismatch(offset: UInt64)
        /// Strict mode: the virtual sizes differ.
        case sizeMismatch
        /// Strict mode: the chain's block status differs for the chunk at this offset.
        case statusMismatch(offset: UInt64)
    }

    public var verdict: Verdict
    /// The common part matched and the sizes differ: qemu-img prints
    /// "Warning: Image size mismatch!" before it looks at the rest of the larger image.
    public var sizeWarning: Bool
}

/// `qemu-img compare`: walks both images by block status (through their backing
/// chains), skips what both report as zero, and compares the rest in chunks of at
/// most 2 MiB at 512-byte granularity — so a mismatch is reported at the start of
/// the first differing 512-byte block, exactly where qemu-img reports it.
public enum CompareOperation {
    /// qemu-img's IO_BUF_SIZE: the largest chunk read at once.
    public static let chunkSize = 2 * 1024 * 1024
    static let sector = 512

    /// Compares `first` and `second` (strict: sizes and block status must match too).
    /// `progress(done, total)` follows the walk over the larger image.
    public static func run(_ first: any DiskImage, _ second: any DiskImage, strict: Bool,
                           progress: (UInt64, UInt64) -> Void = { _, _ in }) throws -> CompareReport {
        let size1 = first.virtualSize, size2 = second.virtualSize
        let common = min(size1, size2), total = max(size1, size2)
        if strict && size1 != size2 { return CompareReport(verdict: .sizeMismatch, sizeWarning: false) }
        let s1 = ChainStatus(first), s2 = ChainStatus(second)
        func failed(_ img: any BlockSource, _ step: QCow2Error.CompareStep, at offset: UInt64, _ e: Error) -> QCow2Error {
            let cause = e as? QCow2Error ?? .malformed(path: img.path, field: "", detail: "\(e)")
            return .compareFailed(first: first.path, second: second.path, offset: offset, step: step, cause: cause)
        }
        func status(_ s: ChainStatus, _ offset: UInt64) throws -> (flags: ChainStatus.Flags, length: UInt64) {
            do { return try s.status(at: offset) } catch { throw failed(s.image, .blockStatus, at: offset, error) }
        }
        func read(_ img: any BlockSource, into buf: inout [UInt8], _ offset: UInt64, _ count: Int) throws {
            do { try Self.read(img, into: &buf, offset, count) } catch { throw failed(img, .read, at: offset, error) }
        }
        var buf1 = [UInt8](repeating: 0, count: chunkSize)
        var buf2 = [UInt8](repeating: 0, count: chunkSize)
        var offset: UInt64 = 0
        progress(0, total)
        while offset < common {
            let a = try status(s1, offset)
            let b = try status(s2, offset)
            var chunk = min(a.length, b.length)
            if strict && a.flags != b.flags {
                return CompareReport(verdict: .statusMismatch(offset: offset), sizeWarning: false)
            }
            if a.flags.zero && b.flags.zero {
                // Both read as zeros: nothing to read.
            } else if a.flags.allocated == b.flags.allocated {
                if a.flags.allocated {
                    chunk = min(chunk, UInt64(chunkSize))
                    try read(first, into: &buf1, offset, Int(chunk))
                    try read(second, into: &buf2, offset, Int(chunk))
                    if let i = firstDifferentBlock(buf1, buf2, Int(chunk)) {
                        return CompareReport(verdict: .contentMismatch(offset: offset + UInt64(i)), sizeWarning: false)
                    }
                }
            } else {
                // Unallocated through the whole chain reads as zeros: the other side must too.
                chunk = min(chunk, UInt64(chunkSize))
                let img = a.flags.allocated ? first : second
                try read(img, into: &buf1, offset, Int(chunk))
                if let i = firstNonzeroBlock(buf1, Int(chunk)) {
                    return CompareReport(verdict: .contentMismatch(offset: offset + UInt64(i)), sizeWarning: false)
                }
            }
            offset += chunk
            progress(offset, total)
        }
        guard size1 != size2 else { return CompareReport(verdict: .identical, sizeWarning: false) }
        // The rest of the larger image must read as zeros.
        let over = size1 > size2 ? first : second
        let so = size1 > size2 ? s1 : s2
        while offset < total {
            let s = try status(so, offset)
            var chunk = s.length
            if s.flags.allocated && !s.flags.zero {
                chunk = min(chunk, UInt64(chunkSize))
                try read(over, into: &buf1, offset, Int(chunk))
                if let i = firstNonzeroBlock(buf1, Int(chunk)) {
                    return CompareReport(verdict: .contentMismatch(offset: offset + UInt64(i)), sizeWarning: true)
                }
            }
            offset += chunk
            progress(offset, total)
        }
        return CompareReport(verdict: .identical, sizeWarning: true)
    }

    static func read(_ img: any BlockSource, into buf: inout [UInt8], _ offset: UInt64, _ count: Int) throws {
        try buf.withUnsafeMutableBytes { b in
            try img.read(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<count]), at: offset)
        }
    }

    /// Offset of the first 512-byte block (from the buffer start) where `a` and `b` differ.
    static func firstDifferentBlock(_ a: [UInt8], _ b: [UInt8], _ count: Int) -> Int? {
        firstBlock(from: 0, a, b, count, differing: true)
    }

    static let zeroBlock = [UInt8](repeating: 0, count: 512)

    /// Offset of the first 512-byte block (from the buffer start) holding a nonzero byte.
    static func firstNonzeroBlock(_ a: [UInt8], _ count: Int) -> Int? {
        a.withUnsafeBytes { p in
            zeroBlock.withUnsafeBytes { z in
                var i = 0
                while i < count {
                    let n = min(sector, count - i)
                    if memcmp(p.baseAddress! + i, z.baseAddress!, n) != 0 { return i }
                    i += n
                }
                return nil
            }
        }
    }
}

extension CompareOperation {
    /// First 512-byte block at or after `start` (a block boundary) where `a` and `b` differ.
    static func firstDifferentBlock(from start: Int, _ a: [UInt8], _ b: [UInt8], _ count: Int) -> Int? {
        firstBlock(from: start, a, b, count, differing: true)
    }

    /// First 512-byte block at or after `start` where `a` and `b` are equal (or `count`).
    static func firstEqualBlock(from start: Int, _ a: [UInt8], _ b: [UInt8], _ count: Int) -> Int {
        firstBlock(from: start, a, b, count, differing: false) ?? count
    }

    static func firstBlock(from start: Int, _ a: [UInt8], _ b: [UInt8], _ count: Int, differing: Bool) -> Int? {
        a.withUnsafeBytes { pa in
            b.withUnsafeBytes { pb in
                var i = start
                while i < count {
                    let n = min(sector, count - i)
                    if (memcmp(pa.baseAddress! + i, pb.baseAddress! + i, n) != 0) == differing { return i }
                    i += n
                }
                return nil
            }
        }
    }
}

/// The status QEMU's `bdrv_block_status_above(bs, NULL, ...)` reports for a whole
/// chain: the flags qemu-img compare -s compares, and the length they hold for.
struct ChainStatus {
    struct Flags: Equatable {
        var allocated = false
        var data = false
        var zero = false
        var offsetValid = false
        var eof = false
    }

    let image: any DiskImage
    let block: BlockStatus

    init(_ image: any DiskImage) {
        self.image = image
        self.block = BlockStatus(image)
    }

    func status(at offset: UInt64) throws -> (flags: Flags, length: UInt64) {
        let size = image.virtualSize
        let e = try block.entry(at: offset, bytes: size - offset)
        var f = Flags(allocated: e.present, data: e.data, zero: e.zero, offsetValid: e.offset != nil,
                      eof: offset + e.length == size)
        if e.zero && !e.present {
            // Zeros because the layer that answered has a backing file that ends before
            // `offset`: QEMU reports them as allocated in that (short) backing file.
            // Otherwise the layer is the last of the chain.
            var layer: any DiskImage = image
            for _ in 0..<e.depth { if let b = layer.backing { layer = b } }
            if layer.backing != nil {
                f.allocated = true
                f.offsetValid = false
            } else if offset + e.length == layer.virtualSize {
                // The walk ended at the bottom of the chain unallocated: QEMU keeps that
                // layer's own end-of-file flag.
                f.eof = true
            }
        }
        return (f, e.length)
    }
}
