#if canImport(Glibc)
import Glibc
#endif

/// `qimg backup`: a new qcow2 overlay holding the clusters a backup needs, written
/// under a temporary name, made durable, renamed into place — and only then is the
/// source's bitmap changed.
public struct BackupOptions {
    public enum Sync: String, Sendable { case full, top, incremental, bitmap }
    public enum BitmapMode: String, Sendable { case onSuccess = "on-success", always, never }

    public var sync: Sync = .full
    public var bitmap: String?
    public var bitmapMode: BitmapMode = .onSuccess
    public var backingFile: String?
    public var backingFormat: ImageFormat?
    public var create = CreateOptions()
    public var compressed = false
    public var speed: UInt64 = 0
    public var force = false
    public var sourceFormat: ImageFormat?
    public var progress: ((UInt64, UInt64) -> Void)?
    public var shouldStop: () -> Bool = { false }
    public init() {}
}

public struct BackupResult: Sendable {
    public var bytesToCopy: UInt64
    public var bytesWritten: UInt64
    public var clusters: UInt64
    public var seconds: Double
    /// For bitmap-mode=always after a failure: where the partial target was kept.
    public var partialTarget: String?
}

public enum BackupOperation {
    /// Name of the temporary file a backup writes before renaming it into place.
    public static func temporaryName(_ target: String) -> String { target + ".qimg-tmp" }

    public static func run(source sourcePath: String, target: String, options o: BackupOptions) throws -> BackupResult {
        let started = monotonicNanoseconds()
        func invalid(_ m: String) -> QCow2Error { .invalidArgument(path: sourcePath, detail: m) }
        // Validation: nothing is touched before all of it passes.
        switch o.sync {
        case .incremental, .bitmap:
            guard o.bitmap != nil else { throw invalid("sync=\(o.sync.rawValue) needs --bitmap") }
        case .top:
            guard o.bitmap == nil else { throw invalid("--bitmap cannot be used with sync=top") }
        case .full: break
        }
        if o.bitmapMode != .onSuccess && o.sync != .bitmap {
            throw invalid("--bitmap-mode only applies to sync=bitmap")
        }
        var st = stat()
        if stat(target, &st) == 0 && !o.force {
            throw QCow2Error.invalidArgument(path: target, detail: "the target exists (use --force to replace it)")
        }
        let tmp = temporaryName(target)
        if stat(tmp, &st) == 0 { unlink(tmp) }  // a leftover of an interrupted run

        // The source: QEMU-compatible write locks when a bitmap will change, else read locks.
        var opener = ImageOpener()
        opener.writable = o.bitmap != nil && !(o.sync == .bitmap && o.bitmapMode == .never)
        let source: any DiskImage
        do {
            source = try opener.open(sourcePath, format: o.sourceFormat)
        } catch let e as QCow2Error {
            if e.message.contains("in use") {
                throw QCow2Error.unsupported(path: sourcePath, detail: "image is in use by another process; back up a running VM with QEMU itself (blockdev-backup sync=incremental, or an NBD export with the bitmap)")
            }
            throw e
        }
        let qsource = source as? QCow2Image
        var toCopy: DirtyBitmap?
        if let name = o.bitmap {
            guard let q = qsource else { throw invalid("bitmaps need a qcow2 source") }
            if o.sync == .full {
                if let e = q.bitmaps.first(where: { $0.name == name }), e.inUse {
                    throw invalid("Bitmap '\(name)' is inconsistent and cannot be used; remove it with 'qimg bitmap --remove' and take a full backup with a new bitmap")
                }
            } else {
                guard q.bitmaps.first(where: { $0.name == name })?.inUse != true else {
                    throw invalid("Bitmap '\(name)' is inconsistent and cannot be used; remove it with 'qimg bitmap --remove' and take a full backup with a new bitmap")
                }
                toCopy = try q.consistentBitmap(name).1
            }
        }
        var backing: (any DiskImage)?
        if let b = o.backingFile {
            backing = try ImageOpener().open(ImageOpener.resolveBacking(b, relativeTo: target), format: o.backingFormat)
            guard backing!.virtualSize == source.virtualSize else {
                throw QCow2Error.invalidArgument(path: b, detail: "the backing file's size (\(backing!.virtualSize)) differs from the source's (\(source.virtualSize))")
            }
        }

        // The target, under its temporary name.
        var c = o.create
        c.format = .qcow2
        c.size = source.virtualSize
        c.backingFile = o.backingFile
        let probedBacking = try backing.map { try ImageOpener.probe($0.file) }
        c.backingFormat = (o.backingFormat ?? probedBacking)?.rawValue
        try ImageCreator.create(tmp, options: c)
        var done = false
        defer { if !done { unlink(tmp) } }
        var topener = ImageOpener()
        topener.writable = true
        topener.openBacking = false
        guard let t = try topener.open(tmp, format: .qcow2) as? QCow2Image else { throw invalid("cannot open the target") }
        t.file.deferSync = true
        var engine = CopyEngine(source: source, target: t)
        engine.compressed = o.compressed
        engine.speed = o.speed
        engine.shouldStop = o.shouldStop
        engine.targetBacking = backing
        let unit = engine.unit

        // What to copy, in target clusters.
        var ranges: [(UInt64, UInt64)]
        var maskZeros = false
        switch o.sync {
        case .full:
            ranges = try CopyEngine.nonZeroRanges(source)
        case .top:
            ranges = []
            var pos: UInt64 = 0
            while pos < source.virtualSize {
                let e = try source.layerExtent(at: pos, maxLength: source.virtualSize - pos)
                if case .unallocated = e.descriptor {} else { ranges.append((pos, e.length)) }
                pos += e.length
            }
            maskZeros = true
        case .incremental, .bitmap:
            ranges = []
            toCopy!.forEachDirtyExtent { ranges.append(($0, $1)) }
            maskZeros = true
        }
        ranges = CopyEngine.normalize(ranges, unit: unit, size: source.virtualSize)
        let total = ranges.reduce(0) { $0 + $1.1 }
        engine.progress = { o.progress?($0, total) }
        do {
            for (a, n) in ranges { try engine.copy(a, n, maskZeros: maskZeros) }
            try t.close()
            t.file.deferSync = false
            try t.file.fullSync()
        } catch {
            // bitmap-mode=always keeps what was copied and gives back only the rest.
            if o.sync == .bitmap && o.bitmapMode == .always, let q = qsource, let name = o.bitmap, let copied = engine.copied {
                let partial = target + ".partial"
                try? t.close()
                t.file.deferSync = false
                try t.file.fullSync()
                guard rename(tmp, partial) == 0 else { throw error }
                done = true
                try syncDirectory(of: partial)
                try clearCopied(q, bitmap: name, copied: copied)
            }
            throw error
        }
        guard rename(tmp, target) == 0 else {
            throw QCow2Error.io(path: target, operation: "rename", errno: errno)
        }
        done = true
        try syncDirectory(of: target)

        // Only now, with the target durable, does the bitmap change.
        if let name = o.bitmap, let q = qsource {
            do {
                switch (o.sync, o.bitmapMode) {
                case (.full, _):
                    let exists = q.bitmaps.contains { $0.name == name }
                    try q.applyBitmapActions(exists ? [.clear] : [.add(granularity: nil, disabled: false)], to: name)
                case (_, .never): break
                default:
                    try q.applyBitmapActions([.clear], to: name)
                }
                try q.close()
            } catch let e as QCow2Error {
                // The backup itself is done: say so, so that nobody retries it blindly.
                throw QCow2Error.unsupported(path: q.path, detail: "the backup \(target) is complete, but bitmap '\(name)' was not updated (\(e.message)); its bits stay set, so the next incremental backup copies those clusters again")
            }
        }
        let seconds = Double(monotonicNanoseconds() - started) / 1e9
        return BackupResult(bytesToCopy: total, bytesWritten: engine.bytesCopied, clusters: total / unit, seconds: seconds, partialTarget: nil)
    }

    /// Clears the granules of `bitmap` wholly covered by what was copied.
    static func clearCopied(_ q: QCow2Image, bitmap name: String, copied: DirtyBitmap) throws {
        var (_, bm) = try q.consistentBitmap(name)
        var clear: [(UInt64, UInt64)] = []
        bm.forEachDirtyExtent { start, length in
            var g = start
            while g < start + length {
                let end = min(g + bm.granularity, q.virtualSize)
                var covered = true
                var p = g
                while p < end { if !copied.test(p) { covered = false; break }; p += copied.granularity }
                if covered { clear.append((g, end - g)) }
                g += bm.granularity
            }
        }
        for (a, n) in clear { bm.reset(a, n) }
        try q.applyBitmapActions([.clear, .merge(source: name)], to: name, mergeSource: { _ in bm })
        try q.close()
    }

    static func syncDirectory(of path: String) throws {
        let dir: String
        if let slash = path.lastIndex(of: "/") { dir = slash == path.startIndex ? "/" : String(path[..<slash]) } else { dir = "." }
        let fd = open(dir, O_RDONLY | O_DIRECTORY)
        guard fd >= 0 else { throw QCow2Error.io(path: dir, operation: "open", errno: errno) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw QCow2Error.io(path: dir, operation: "fsync", errno: errno) }
    }
}
