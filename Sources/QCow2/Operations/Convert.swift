/// Copies guest data from one image (through its backing chain) into another: the
/// engine of `convert` and `backup`. Ranges that read as zeros stay sparse.
public struct CopyEngine {
    public let source: any DiskImage
    public let target: any DiskImage
    /// Where the target's backing file reads differently from zero, zeros must be
    /// written explicitly (they would otherwise show the backing data).
    public var targetBacking: (any DiskImage)?
    public var compressed = false
    /// Zero runs at least this long are not written (qemu-img's -S); 0 writes everything.
    public var minSparse: UInt64 = 4096
    /// Called after each chunk with the bytes done so far.
    public var progress: ((UInt64) -> Void)?
    /// Checked between chunks; returning true stops the copy with an error.
    public var shouldStop: () -> Bool = { false }
    /// Bytes per second (0: unlimited).
    public var speed: UInt64 = 0
    /// Guest ranges written so far (for bitmap-mode=always), at cluster granularity.
    public private(set) var copied: DirtyBitmap?
    public private(set) var bytesCopied: UInt64 = 0
    public private(set) var bytesDone: UInt64 = 0

    public init(source: any DiskImage, target: any DiskImage) {
        self.source = source
        self.target = target
        let unit = UInt64((target as? QCow2Image)?.geometry.clusterSize ?? 65536)
        copied = DirtyBitmap(granularity: unit, size: source.virtualSize)
    }

    /// The unit of work: the target's cluster (whole clusters are what a backup holds).
    public var unit: UInt64 { UInt64((target as? QCow2Image)?.geometry.clusterSize ?? 65536) }

    private var started: UInt64 = 0
    private var writebackMark: UInt64 = 0
    /// Data written between two early-writeback requests (see BlockFile.startWriteback).
    static let writebackInterval: UInt64 = 16 << 20

    /// Copies [offset, offset+length) (whole units); with `maskZeros`, zero data is
    /// written as zero clusters so that it hides what the target's backing file holds.
    public mutating func copy(_ offset: UInt64, _ length: UInt64, maskZeros: Bool) throws {
        let size = source.virtualSize
        let chunk = max(unit, 2 << 20) / unit * unit
        var pos = offset
        let end = min(size, offset + length)
        var buf = [UInt8](repeating: 0, count: Int(chunk))
        var backingBuf: [UInt8] = []
        while pos < end {
            if shouldStop() { throw QCow2Error.io(path: target.path, operation: "backup", errno: 4 /* EINTR */) }
            let n = Int(min(chunk, end - pos))
            try buf.withUnsafeMutableBytes { try source.read(into: UnsafeRawBufferPointer(rebasing: $0[0..<n]).mutable, at: pos) }
            // Split the chunk into units: all-zero units are skipped or masked; runs of
            // data units are written with one request (compressed: one per cluster).
            var u = 0
            var runStart = 0
            func flushData(upTo end: Int) throws {
                guard end > runStart else { return }
                let guest = pos + UInt64(runStart)
                try buf.withUnsafeBytes { try writeData(UnsafeRawBufferPointer(rebasing: $0[runStart..<end]), at: guest) }
                bytesCopied += UInt64(end - runStart)
                copied?.set(guest, UInt64(end - runStart))
            }
            while u < n {
                let len = min(Int(unit), n - u)
                if Self.allZero(buf, u, len) {
                    try flushData(upTo: u)
                    runStart = u + len
                    let guest = pos + UInt64(u)
                    let hidden = try maskZeros || backingHasData(guest, len, &backingBuf)
                    if hidden {
                        try writeZeros(guest, UInt64(len))
                        copied?.set(guest, UInt64(len))
                    }
                }
                u += len
            }
            try flushData(upTo: n)
            pos += UInt64(n)
            bytesDone += UInt64(n)
            if bytesCopied - writebackMark >= Self.writebackInterval {
                writebackMark = bytesCopied
                target.file.startWriteback()
            }
            progress?(bytesDone)
            try throttle()
        }
    }

    private func backingHasData(_ guest: UInt64, _ len: Int, _ buf: inout [UInt8]) throws -> Bool {
        guard let b = targetBacking, guest < b.virtualSize else { return false }
        let n = Int(min(UInt64(len), b.virtualSize - guest))
        if buf.count < n { buf = [UInt8](repeating: 0, count: n) }
        try buf.withUnsafeMutableBytes { try b.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: guest) }
        return !Self.allZero(buf, 0, n)
    }

    static func allZero(_ b: [UInt8], _ start: Int, _ len: Int) -> Bool {
        b.withUnsafeBytes { p in
            var i = start
            let end = start + len
            while i + 8 <= end {
                if p.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
                i += 8
            }
            while i < end { if p[i] != 0 { return false }; i += 1 }
            return true
        }
    }

    private func writeZeros(_ guest: UInt64, _ len: UInt64) throws {
        if let q = target as? QCow2Image {
            try q.writeZeroes(at: guest, length: len)
        } else if let r = target as? RawImage {
            try r.write([UInt8](repeating: 0, count: Int(len)).withUnsafeBytes { $0 }, at: guest)
        }
    }

    private func writeData(_ data: UnsafeRawBufferPointer, at guest: UInt64) throws {
        if let q = target as? QCow2Image {
            if compressed && q.geometry.isAligned(guest)
                && (data.count % q.geometry.clusterSize == 0 || guest + UInt64(data.count) == q.virtualSize) {
                // Whole clusters (or up to the end of the disk), compressed on every core.
                try q.writeCompressedClusters(data, at: guest)
            } else {
                try q.write(data, at: guest)
            }
        } else if let r = target as? RawImage {
            try r.write(data, at: guest)
        }
    }

    private mutating func throttle() throws {
        guard speed > 0 else { return }
        let now = monotonicNanoseconds()
        if started == 0 { started = now }
        let due = started + bytesDone * 1_000_000_000 / speed
        if due > now { sleepNanoseconds(due - now) }
    }

    /// Sorts, aligns to `unit` and merges ranges (clipped to `size`).
    public static func normalize(_ ranges: [(UInt64, UInt64)], unit: UInt64, size: UInt64) -> [(UInt64, UInt64)] {
        var out: [(UInt64, UInt64)] = []
        for (a, n) in ranges.sorted(by: { $0.0 < $1.0 }) where n > 0 {
            let s = a / unit * unit
            let e = min(size, (a + n + unit - 1) / unit * unit)
            if let last = out.last, last.0 + last.1 >= s {
                out[out.count - 1].1 = max(last.0 + last.1, e) - last.0
            } else {
                out.append((s, e - s))
            }
        }
        return out
    }

    /// Ranges of the source that do not read as zeros (data anywhere in the chain).
    public static func nonZeroRanges(_ image: any DiskImage) throws -> [(UInt64, UInt64)] {
        var out: [(UInt64, UInt64)] = []
        try MapOperation.run(image) { e in
            if e.data || !e.zero {
                if let last = out.last, last.0 + last.1 == e.start { out[out.count - 1].1 += e.length } else { out.append((e.start, e.length)) }
            }
        }
        return out
    }
}

extension UnsafeRawBufferPointer {
    var mutable: UnsafeMutableRawBufferPointer { UnsafeMutableRawBufferPointer(mutating: self) }
}

#if canImport(Glibc)
import Glibc
#endif

func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

func sleepNanoseconds(_ ns: UInt64) {
    var request = timespec(tv_sec: Int(ns / 1_000_000_000), tv_nsec: Int(ns % 1_000_000_000))
    var remaining = timespec()
    while nanosleep(&request, &remaining) != 0 && errno == EINTR { request = remaining }
}

/// `qemu-img convert`: a new standalone image (or an overlay with -B) holding the
/// source's guest data; zero ranges stay sparse.
public struct ConvertOptions: Sendable {
    public var create = CreateOptions()
    public var compressed = false
    /// -B: the target's backing file (name as stored, format).
    public var backingFile: String?
    public var backingFormat: ImageFormat?
    /// -n: write into an existing target instead of creating it.
    public var skipCreate = false
    public var minSparse: UInt64 = 4096
    /// --bitmaps: copy the source's consistent persistent bitmaps.
    public var copyBitmaps = false
    public var skipBrokenBitmaps = false
    public init() {}
}

public enum ConvertOperation {
    public static func run(source: any DiskImage, target path: String, options o: ConvertOptions,
                           progress: ((UInt64, UInt64) -> Void)? = nil) throws {
        // Bitmaps are checked before anything is written.
        var bitmaps: [(BitmapDirectoryEntry, DirtyBitmap)] = []
        if o.copyBitmaps, let q = source as? QCow2Image {
            for e in q.bitmaps {
                if e.inUse {
                    if o.skipBrokenBitmaps { continue }
                    throw QCow2Error.unsupported(path: q.path, detail: "Cannot copy inconsistent bitmap '\(e.name)'; try --skip-broken-bitmaps, or use 'qimg bitmap --remove' to delete it")
                }
                bitmaps.append((e, try q.loadBitmap(e)))
            }
            if !bitmaps.isEmpty && (o.create.format != .qcow2 || o.create.version < 3) {
                throw QCow2Error.unsupported(path: path, detail: "bitmaps can only be copied into qcow2 version 3 images")
            }
        }
        // A new target is written under a temporary name in the same directory and renamed
        // into place once durable: an interrupted convert never leaves a partial image under
        // the target's name (qemu-img does). -n and non-regular targets (block devices) are
        // written in place.
        var st = stat()
        let inPlace = o.skipCreate || (stat(path, &st) == 0 && (st.st_mode & S_IFMT) != S_IFREG)
        // An existing symlink keeps pointing where it did: the file it names is replaced.
        var final = path
        if !inPlace, lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFLNK, let real = realpath(path, nil) {
            final = String(cString: real)
            free(real)
        }
        let work = inPlace ? path : BackupOperation.temporaryName(final)
        var renamed = false
        // An existing target's permissions (and owner, where allowed) carry over to its replacement.
        var replaced = stat()
        let replacing = !inPlace && stat(final, &replaced) == 0
        if !inPlace { unlink(work) }  // a leftover of an interrupted run
        defer { if !inPlace && !renamed { unlink(work) } }
        if !o.skipCreate {
            var c = o.create
            c.size = source.virtualSize
            c.backingFile = o.backingFile
            c.backingFormat = o.backingFormat?.rawValue
            try ImageCreator.create(work, options: c)
        }
        var opener = ImageOpener()
        opener.writable = true
        opener.openBacking = false
        let target = try opener.open(work, format: o.skipCreate ? nil : o.create.format)
        if replacing {
            _ = fchmod(target.file.fd, replaced.st_mode & 0o7777)
            _ = fchown(target.file.fd, replaced.st_uid, replaced.st_gid)
        }
        target.file.deferSync = true
        var engine = CopyEngine(source: source, target: target)
        engine.compressed = o.compressed
        engine.minSparse = o.minSparse
        if let b = o.backingFile {
            engine.targetBacking = try ImageOpener().open(ImageOpener.resolveBacking(b, relativeTo: path), format: o.backingFormat)
        }
        let total = source.virtualSize
        engine.progress = { progress?($0, total) }
        // Only ranges that hold data (in the source, or in the target's backing file,
        // whose data zeros of the source must hide) are visited; an existing target
        // (-n) is overwritten entirely.
        if o.skipCreate {
            try engine.copy(0, total, maskZeros: true)
        } else {
            var ranges = try CopyEngine.nonZeroRanges(source)
            if let b = engine.targetBacking { ranges += try CopyEngine.nonZeroRanges(b).filter { $0.0 < total } }
            for (a, n) in CopyEngine.normalize(ranges, unit: engine.unit, size: total) {
                try engine.copy(a, n, maskZeros: false)
            }
        }
        if let q = target as? QCow2Image {
            for (e, bm) in bitmaps {
                try q.applyBitmapActions([.add(granularity: e.granularity, disabled: !e.isAuto)], to: e.name)
                try q.applyBitmapActions([.merge(source: e.name)], to: e.name, mergeSource: { _ in bm })
            }
            try q.close()
        }
        target.file.deferSync = false
        try target.file.fullSync()
        if !inPlace {
            guard rename(work, final) == 0 else { throw QCow2Error.io(path: final, operation: "rename", errno: errno) }
            renamed = true
            try BackupOperation.syncDirectory(of: final)
        }
    }
}
