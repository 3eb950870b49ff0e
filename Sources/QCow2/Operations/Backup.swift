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
    /// How zlib-type compressed clusters are encoded.
    public var zlibEncoder = ZlibEncoder.igzip
    public var speed: UInt64 = 0
    public var force = false
    /// Allow an incremental or bitmap backup without a backing file (a standalone delta).
    public var allowNoBacking = false
    public var sourceFormat: ImageFormat?
    public var progress: ((UInt64, UInt64) -> Void)?
    public var shouldStop: () -> Bool = { false }
    /// Told of every data write of the copy (a repository backup hashes them).
    var observer: (any CopyObserver)?
    public init() {}

    /// How a backup's copy runs (convert's copy, with these options).
    var copySettings: CopySettings {
        var settings = CopySettings()
        settings.compressed = compressed
        settings.zlibEncoder = zlibEncoder
        settings.speed = speed
        settings.shouldStop = shouldStop
        // Only bitmap-mode=always gives back what a failed copy holds.
        settings.tracksCopied = sync == .bitmap && bitmapMode == .always
        settings.observer = observer
        return settings
    }
}

public struct BackupResult: Sendable {
    public var bytesToCopy: UInt64
    public var bytesWritten: UInt64
    public var clusters: UInt64
    public var seconds: Double
}

public enum BackupOperation {
    /// What a run works with once it is validated and has its locks.
    struct Inputs {
        var source: any DiskImage
        var qsource: QCow2Image?
        var backing: (any DiskImage)?
        var changes: (any ChangeSet)?
    }

    public static func run(source sourcePath: String, target: String, options o: BackupOptions) throws -> BackupResult {
        let started = monotonicNanoseconds()
        let targetExists = try validate(source: sourcePath, target: target, options: o)
        let inputs = try openInputs(source: sourcePath, target: target, targetExists: targetExists, options: o)
        let source = inputs.source

        // The target, under a temporary name of this run's.
        let staged = try StagedFile(final: target)
        defer { staged.discard() }
        let named = staged.naming
        // The copy is convert's; a backup only adds its ranges and its bitmap handling.
        let settings = o.copySettings
        var copy: TargetCopy
        do {
            try createTarget(staged.temporaryPath, size: source.virtualSize, backing: inputs.backing, options: o)
            copy = try TargetCopy(source: source, work: staged.temporaryPath, format: .qcow2,
                                  targetBacking: inputs.backing, settings: settings)
        } catch { throw named(error) }
        let unit = copy.unit
        let (ranges, maskZeros) = try rangesToCopy(inputs, sync: o.sync, unit: unit)
        let total = ranges.reduce(0) { $0 + $1.1 }
        do {
            try copy.run(Plan(data: ranges, zero: []), maskZeros: maskZeros, progress: o.progress)
            try copy.finish()
        } catch {
            // bitmap-mode=always keeps what was copied and gives back only the rest.
            if o.sync == .bitmap && o.bitmapMode == .always, let q = inputs.qsource, let name = o.bitmap,
               let changes = inputs.changes, let copied = copy.engine.copied, copy.engine.bytesCopied > 0 {
                throw keepPartial(staged, copy.target, source: q, bitmap: name, changes: changes, copied: copied, failure: named(error))
            }
            throw named(error)
        }
        try staged.commit(replacing: o.force, durable: true)
        // Only now, with the target durable, does the bitmap change.
        try updateBitmap(inputs, target: target, options: o)
        let seconds = Double(monotonicNanoseconds() - started) / 1e9
        return BackupResult(bytesToCopy: total, bytesWritten: copy.engine.bytesCopied, clusters: total / unit, seconds: seconds)
    }

    /// Checks the options and the target before anything is opened; returns whether the
    /// target exists (and may be replaced).
    static func validate(source sourcePath: String, target: String, options o: BackupOptions) throws -> Bool {
        func invalid(_ m: String) -> QCow2Error { .invalidArgument(path: sourcePath, detail: m) }
        switch o.sync {
        case .incremental, .bitmap:
            guard o.bitmap != nil else { throw invalid("a backup with sync=\(o.sync.rawValue) needs a bitmap") }
            // A delta without its backing file reads as zeros wherever nothing changed.
            guard o.backingFile != nil || o.allowNoBacking else {
                throw invalid("an incremental backup needs the previous backup as its backing file (or an explicit request for a standalone delta)")
            }
        case .top:
            guard o.bitmap == nil else { throw invalid("a backup with sync=top takes no bitmap") }
        case .full: break
        }
        if o.bitmapMode != .onSuccess && o.sync != .bitmap {
            throw invalid("a bitmap mode applies only to sync=bitmap")
        }
        var st = stat()
        let targetExists = Sys.stat(target, &st) == 0
        if targetExists && (st.st_mode & S_IFMT) == S_IFDIR {
            throw QCow2Error.invalidArgument(path: target, detail: "is a directory")
        }
        if targetExists && !o.force {
            throw QCow2Error.targetExists(path: target)
        }
        return targetExists
    }

    /// Locks before any file changes: the source (write locks when a bitmap will change,
    /// else read locks), then the target's backing file; then the checks that need them.
    static func openInputs(source sourcePath: String, target: String, targetExists: Bool, options o: BackupOptions) throws -> Inputs {
        var opener = ImageOpener()
        opener.writable = o.bitmap != nil && !(o.sync == .bitmap && o.bitmapMode == .never)
        // Read once, in guest order: the L2 tables read do not pile up in the cache.
        opener.cacheBytes = QCow2Image.streamingCacheBytes
        let source = try opener.open(sourcePath, format: o.sourceFormat)
        var inputs = Inputs(source: source, qsource: source as? QCow2Image)
        if let b = o.backingFile {
            let loc = try BackingName.locate(b, format: o.backingFormat, relativeTo: target)
            let backing = try ImageOpener().open(loc.path, format: loc.format)
            guard backing.virtualSize == source.virtualSize else {
                throw QCow2Error.invalidArgument(path: b, detail: "the backing file's size (\(backing.virtualSize)) differs from the source's (\(source.virtualSize))")
            }
            inputs.backing = backing
        }
        // Replacing the source, the backing file or any file of their chains would
        // destroy what the backup is made of.
        if targetExists {
            try refuseTargetInChains(target, source: source, backing: inputs.backing)
        }
        if let name = o.bitmap {
            guard let q = inputs.qsource else {
                throw QCow2Error.invalidArgument(path: sourcePath, detail: "bitmaps need a qcow2 source")
            }
            if q.bitmaps.first(where: { $0.name == name })?.inUse == true {
                throw QCow2Error.bitmapInconsistent(path: sourcePath, bitmap: name)
            }
            if o.sync != .full { inputs.changes = try HeldBitmapChanges.of(q, bitmap: name) }
        }
        return inputs
    }

    /// Creates the target at `path`: a qcow2 overlay of the backing file, if any.
    static func createTarget(_ path: String, size: UInt64, backing: (any DiskImage)?, options o: BackupOptions) throws {
        var c = o.create
        c.format = .qcow2
        c.size = size
        c.backingFile = o.backingFile
        let probedBacking = try backing.map { try ImageOpener.probe($0.file, path: $0.path) }
        c.backingFormat = (o.backingFormat ?? probedBacking)?.rawValue
        try ImageCreator.create(path, options: c, filledThenSynced: true)
    }

    /// What to copy, in whole target clusters, and whether zeros must be written (they
    /// hide what the target's backing file holds).
    static func rangesToCopy(_ inputs: Inputs, sync: BackupOptions.Sync, unit: UInt64) throws -> ([(UInt64, UInt64)], Bool) {
        let source = inputs.source
        var ranges: [(UInt64, UInt64)] = []
        switch sync {
        case .full:
            ranges = try CopyEngine.nonZeroRanges(source)
        case .top:
            var pos: UInt64 = 0
            while pos < source.virtualSize {
                let e = try source.layerExtent(at: pos, maxLength: source.virtualSize - pos)
                if case .unallocated = e.descriptor {} else { ranges.append((pos, e.length)) }
                pos += e.length
            }
        case .incremental, .bitmap:
            inputs.changes?.forEachChangedRange { ranges.append(($0, $1)) }
        }
        return (CopyEngine.normalize(ranges, unit: unit, size: source.virtualSize), sync != .full)
    }

    /// After the target is durable: the consumed changes are released (or, after a full
    /// backup, the bitmap restarts empty), and the source is closed.
    static func updateBitmap(_ inputs: Inputs, target: String, options o: BackupOptions) throws {
        guard let name = o.bitmap, let q = inputs.qsource else { return }
        do {
            if o.bitmapMode != .never {
                if let changes = inputs.changes { try changes.consumed() } else { try PersistentBitmapChanges.restart(q, bitmap: name) }
            }
            try q.close()
        } catch let e as QCow2Error {
            // The backup itself is done: say so, so that nobody retries it blindly.
            throw QCow2Error.unsupported(path: q.path, detail: "the backup \(target) is complete, but bitmap '\(name)' was not updated (\(e.message)); its bits stay set, so the next incremental backup copies those clusters again")
        }
    }

    /// Refuses a target that is the source, the target's backing file or any file of
    /// their backing chains (by device and inode, whatever the spelling).
    static func refuseTargetInChains(_ target: String, source: (any DiskImage)?, backing: (any DiskImage)?) throws {
        guard let id = try? BlockFile(path: target).identity() else { return }
        if let (l, depth) = try source?.layer(withIdentity: id) {
            let role = depth == 0 ? "the image being backed up" : "in the backing chain of the image being backed up"
            throw QCow2Error.invalidArgument(path: target, detail: "the target is \(role) ('\(l.path)'); it cannot be replaced by its backup")
        }
        if let (l, depth) = try backing?.layer(withIdentity: id) {
            let role = depth == 0 ? "the backup's backing file" : "in the backing chain of the backup's backing file"
            throw QCow2Error.invalidArgument(path: target, detail: "the target is \(role) ('\(l.path)'); replacing it would break the backup chain")
        }
    }

    /// bitmap-mode=always after a failure: the target so far, its leaked clusters released
    /// (the copy raises refcounts before it writes), made durable and renamed to
    /// TARGET.partial (or .partial.N: an earlier partial is never replaced); then the bits
    /// of what it holds are cleared. Returns the error to report: the failure, and where
    /// the partial backup is and how to use it.
    static func keepPartial(_ staged: StagedFile, _ t: any DiskImage, source q: QCow2Image, bitmap name: String,
                            changes: any ChangeSet, copied: DirtyBitmap, failure: Error) -> Error {
        let why = (failure as? QCow2Error)?.description ?? "\(failure)"
        func incomplete(_ kept: String) -> QCow2Error { .incomplete(path: q.path, cause: why, kept: kept) }
        do {
            // A fresh open: the failed session's caches may not match the disk. Its locks
            // go first (it is never used again).
            ImageLock.release(fd: t.file.fd)
            var topener = ImageOpener()
            topener.writable = true
            topener.openBacking = false
            guard let p = try topener.open(staged.temporaryPath, format: .qcow2) as? QCow2Image else { return failure }
            let r = try CheckOperation.repair(p, mode: .leaks, report: { _ in })
            guard r.corruptions == 0, r.leaks == 0 else { return failure }
            try p.flush()
            try p.file.fullSync()
            var kept: String?
            for n in 0..<100 {
                let name = staged.finalPath + ".partial" + (n == 0 ? "" : ".\(n)")
                var st = stat()
                if Sys.lstat(name, &st) == 0 { continue }
                do { try staged.commit(replacing: false, durable: true, as: name); kept = name; break } catch QCow2Error.invalidArgument {
                    continue  // appeared meanwhile
                }
            }
            guard let partial = kept else { return failure }
            do {
                try changes.partlyConsumed(copied)
                try q.close()
            } catch let e as QCow2Error {
                return incomplete("what was copied is kept in \(partial), but bitmap '\(name)' was not updated (\(e.message)): the next backup copies those clusters again, so \(partial) may be removed")
            }
            return incomplete("what was copied is kept in \(partial) (a clean qcow2 overlay, backed like the target would have been) and its bits were cleared from bitmap '\(name)': keep it, and give it as the backing file of the next backup, which copies the rest")
        } catch {
            return failure
        }
    }
}
