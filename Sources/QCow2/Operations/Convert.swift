#if canImport(Glibc)
import Glibc
#endif

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
    /// Make the target durable (fsync, then rename into place, then fsync the directory).
    /// false is qemu-img's `-t unsafe`: the data may still be in the page cache when
    /// the target appears, and a power loss can lose it.
    public var durable = true
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
        engine.earlyWriteback = o.durable
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
        if o.durable { try target.file.fullSync() }
        if !inPlace {
            guard rename(work, final) == 0 else { throw QCow2Error.io(path: final, operation: "rename", errno: errno) }
            renamed = true
            if o.durable { try BackupOperation.syncDirectory(of: final) }
        }
    }
}
