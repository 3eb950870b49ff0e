#if canImport(Glibc)
import Glibc
#endif

/// How convert and backup copy (the same for both: a full backup is convert's copy).
struct CopySettings {
    var compressed = false
    var zlibEncoder = ZlibEncoder.igzip
    /// Zero runs at least this long are left out (qemu-img's -S); 0 writes every byte.
    var minSparse: UInt64 = 4096
    /// Bytes per second (0: unlimited).
    var speed: UInt64 = 0
    /// Early writeback during the copy and an fsync at the end.
    var durable = true
    var shouldStop: () -> Bool = { false }
    /// Record the guest ranges written (`CopyEngine.copied`; a bitmap as large as the
    /// disk's dirty areas).
    var tracksCopied = false
    /// Told of every data write of the copy.
    var observer: (any CopyObserver)?
}

/// The one copy path of convert and backup: the target file (created by the caller, or
/// an existing one) opened for writing without its backing chain, `CopyEngine` set up
/// from `CopySettings`, a plan of data and zero ranges written in guest order, then the
/// target finished (compressed images padded to a sector, the caller's last changes,
/// closed, fsynced). Where the file lives (`StagedFile`) is the caller's.
struct TargetCopy {
    let target: any DiskImage
    private(set) var engine: CopyEngine
    let settings: CopySettings

    /// Opens `work` (`format` nil: probed) for writing. An existing target's permissions
    /// (and owner, where allowed) in `replaced` carry over to it.
    init(source: any BlockSource, work: String, format: ImageFormat?, targetBacking: (any BlockSource)?,
         settings: CopySettings, keeping replaced: stat? = nil) throws {
        var opener = ImageOpener()
        opener.writable = true
        opener.openBacking = false
        let target = try opener.open(work, format: format)
        if let replaced {
            _ = fchmod(target.file.fd, replaced.st_mode & 0o7777)
            _ = fchown(target.file.fd, replaced.st_uid, replaced.st_gid)
        }
        target.file.deferSync = true
        target.file.tracksSize = true
        var engine = CopyEngine(source: source, target: target)
        engine.compressed = settings.compressed
        engine.zlibEncoder = settings.zlibEncoder
        engine.minSparse = settings.minSparse
        engine.speed = settings.speed
        engine.earlyWriteback = settings.durable
        engine.shouldStop = settings.shouldStop
        engine.targetBacking = targetBacking
        if settings.tracksCopied { engine.copied = DirtyBitmap(granularity: engine.unit, size: source.virtualSize) }
        engine.observer = settings.observer
        // -S: zero runs count in aligned pieces of S (a power of two: qemu-img aligns the
        // runs it leaves out to it), and in whole clusters of a qcow2 target at least; with
        // extended L2 in pieces of S alone, as qemu-img writes them (zero subclusters stay
        // unallocated, the zero parts of written ones are not written).
        if settings.minSparse > 0 {
            let floor = UInt64(1) << UInt64(63 - settings.minSparse.leadingZeroBitCount)
            let allocation = (target as? QCow2Image).map { $0.geometry.extendedL2 ? 512 : UInt64($0.geometry.clusterSize) } ?? 512
            engine.sparseUnit = min(max(floor, allocation), 2 << 20)
        }
        self.target = target
        self.engine = engine
        self.settings = settings
    }

    /// The unit plans are made in: the target's cluster (raw: sectors, so that the holes
    /// of a raw source stay holes).
    var unit: UInt64 { target is QCow2Image ? engine.unit : 512 }

    /// Copies `plan.data` (zero runs left out, or written as zeros with `maskZeros`: they
    /// hide what the target's backing file holds) and writes `plan.zero` as zeros without
    /// reading it. `progress(done, total)` counts the bytes visited, so that it reaches
    /// 100% on a sparse disk.
    mutating func run(_ plan: Plan, maskZeros: Bool, progress: ((UInt64, UInt64) -> Void)?) throws {
        let total = plan.data.reduce(0) { $0 + $1.1 } + plan.zero.reduce(0) { $0 + $1.1 }
        var zeroed: UInt64 = 0
        engine.progress = { progress?($0 + zeroed, total) }
        for (a, n, isData) in plan.inOrder {
            if isData {
                try engine.copy(a, n, maskZeros: maskZeros)
            } else if let q = target as? QCow2Image {
                if settings.shouldStop() { throw QCow2Error.io(path: target.path, operation: "copy", errno: EINTR) }
                try q.writeZeroes(at: a, length: n)
                zeroed += n
                progress?(engine.bytesDone + zeroed, total)
            }
        }
    }

    /// Pads a compressed image to a whole sector, lets `last` change a qcow2 target (its
    /// bitmaps), closes it and, when durable, fsyncs it.
    func finish(_ last: (QCow2Image) throws -> Void = { _ in }) throws {
        if let q = target as? QCow2Image {
            if settings.compressed { try q.padToSector() }
            try last(q)
            try q.close()
        }
        target.file.deferSync = false
        if settings.durable { try target.file.fullSync() }
    }
}
