#if canImport(Glibc)
import Glibc
#endif

/// `qemu-img convert`: a new standalone image (or an overlay with -B) holding the
/// source's guest data; zero ranges stay sparse (-S).
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
    /// Make the target durable (fsync, then rename into place, then fsync the directory).
    /// false is qemu-img's `-t unsafe`: the data may still be in the page cache when
    /// the target appears, and a power loss can lose it.
    public var durable = true
    /// Checked between chunks (SIGINT/SIGTERM): true stops the copy; nothing is left behind.
    public var shouldStop: @Sendable () -> Bool = { false }
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
        let exists = Sys.stat(path, &st) == 0
        if exists && (st.st_mode & S_IFMT) == S_IFDIR {
            throw QCow2Error.invalidArgument(path: path, detail: "is a directory")
        }
        let inPlace = o.skipCreate || (exists && (st.st_mode & S_IFMT) != S_IFREG)
        // An existing symlink keeps pointing where it did: the file it names is replaced.
        var final = path
        if !inPlace, Sys.lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFLNK, let real = Sys.realpath(path) {
            final = real
        }
        // The target's backing file, and a refusal to overwrite a file the copy reads.
        var targetBacking: (any DiskImage)?
        if let b = o.backingFile {
            targetBacking = try ImageOpener().open(ImageOpener.resolveBacking(b, relativeTo: path), format: o.backingFormat)
        }
        if exists { try refuseTargetInChains(path, source: source, backing: targetBacking) }
        // An existing target's permissions (and owner, where allowed) carry over to its replacement.
        var replaced = stat()
        let replacing = !inPlace && Sys.stat(final, &replaced) == 0
        let staged = inPlace ? nil : try StagedFile(final: final)
        defer { staged?.discard() }
        let work = staged?.temporaryPath ?? path
        do {
            try write(source: source, work: work, backing: targetBacking, bitmaps: bitmaps, options: o,
                      keeping: replacing ? replaced : nil, progress: progress)
            try staged?.commit(replacing: true, durable: o.durable)
        } catch let e as QCow2Error where e.path == work && work != path {
            throw e.withPath(path)
        }
    }

    /// Refuses a target that is a file of the source's chain or of the target's backing chain.
    static func refuseTargetInChains(_ target: String, source: any DiskImage, backing: (any DiskImage)?) throws {
        guard let id = try? BlockFile(path: target).identity() else { return }
        for (chain, role) in [(Optional(source), "the source image or in its backing chain"), (backing, "the output's backing file or in its backing chain")] {
            var layer = chain
            while let l = layer {
                if try l.file.identity() == id {
                    throw QCow2Error.invalidArgument(path: target, detail: "the output is \(role) ('\(l.path)'); it cannot be overwritten by the copy")
                }
                layer = l.backing
            }
        }
    }

    /// Creates (unless -n) and fills `work`, and makes it durable when asked.
    static func write(source: any DiskImage, work: String, backing: (any DiskImage)?, bitmaps: [(BitmapDirectoryEntry, DirtyBitmap)],
                      options o: ConvertOptions, keeping replaced: stat?, progress: ((UInt64, UInt64) -> Void)?) throws {
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
        if let replaced {
            _ = fchmod(target.file.fd, replaced.st_mode & 0o7777)
            _ = fchown(target.file.fd, replaced.st_uid, replaced.st_gid)
        }
        target.file.deferSync = true
        var engine = CopyEngine(source: source, target: target)
        engine.compressed = o.compressed
        engine.minSparse = o.minSparse
        engine.earlyWriteback = o.durable
        engine.shouldStop = o.shouldStop
        engine.targetBacking = backing
        let size = source.virtualSize
        // Ranges in target clusters (raw: sectors; the holes of a raw source stay holes).
        let unit = target is QCow2Image ? engine.unit : 512
        // -S: zero runs count in aligned pieces of S (a power of two: qemu-img aligns the
        // runs it leaves out to it), and in whole clusters of a qcow2 target at least.
        if o.minSparse > 0 {
            let floor = UInt64(1) << UInt64(63 - o.minSparse.leadingZeroBitCount)
            engine.sparseUnit = min(max(floor, (target as? QCow2Image).map { UInt64($0.geometry.clusterSize) } ?? 512), 2 << 20)
        }
        // Only ranges that hold data (in the source, or in the target's backing file,
        // whose data zeros of the source must hide) are visited, all of the disk with
        // -S 0; an existing target (-n) is overwritten entirely. Progress counts the bytes
        // visited (as qemu-img counts the allocated data), so it reaches 100% on a sparse image.
        var ranges: [(UInt64, UInt64)] = [(0, size)]
        if !o.skipCreate {
            ranges = o.minSparse == 0 ? [(UInt64(0), size)] : try CopyEngine.nonZeroRanges(source)
            if let b = engine.targetBacking { ranges += try CopyEngine.nonZeroRanges(b).filter { $0.0 < size } }
            ranges = CopyEngine.normalize(ranges, unit: unit, size: size)
        }
        let total = ranges.reduce(0) { $0 + $1.1 }
        engine.progress = { progress?($0, total) }
        for (a, n) in ranges { try engine.copy(a, n, maskZeros: o.skipCreate) }
        if let q = target as? QCow2Image {
            if o.compressed { try q.padToSector() }
            for (e, bm) in bitmaps {
                try q.applyBitmapActions([.add(granularity: e.granularity, disabled: !e.isAuto)], to: e.name)
                try q.applyBitmapActions([.merge(source: e.name)], to: e.name, mergeSource: { _ in bm })
            }
            try q.close()
        }
        target.file.deferSync = false
        if o.durable { try target.file.fullSync() }
    }
}
