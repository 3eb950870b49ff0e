#if canImport(Glibc)
import Glibc
#endif

/// `qimg backup --nbd URI`: a backup pulled from an NBD export (libvirt's pull mode,
/// `qemu-nbd -B`, qemu-storage-daemon's `block-export-add` with `bitmaps`). Full: every
/// range `base:allocation` reports as data (holes and zeros stay unallocated).
/// Incremental: the ranges the export's `qemu:dirty-bitmap:NAME` context marks dirty, in
/// whole target clusters: data read with NBD_CMD_READ, and clusters that read as zeros
/// written as zero clusters, so that they hide the older data of the backing file. The
/// target is written as the offline backup writes it (`StagedFile`, `TargetCopy`); the
/// export's bitmap is left to whoever set it up.
public enum PullBackup {
    /// `beforeCommit` runs once the target is complete and durable under its temporary name,
    /// before it is renamed into place: a throw there keeps nothing (the source of a live view
    /// checks that its view still is the point in time).
    /// `timeout`: seconds the server may stay silent (handshake, or any request) before the
    /// run fails.
    public static func run(uri: String, target: String, options o: BackupOptions, timeout: Double = NBDClient.defaultTimeout,
                           beforeCommit: () throws -> Void = {}) throws -> BackupResult {
        let started = monotonicNanoseconds()
        try validate(uri: uri, options: o)
        let targetExists = try BackupOperation.validate(source: uri, target: target, options: o)
        var contexts = [NBDSource.allocationContext]
        if o.sync == .incremental, let b = o.bitmap { contexts.append(NBDDirtyChanges.context(bitmap: b)) }
        let client = try NBDClient(uri: uri, contexts: contexts, timeout: timeout, shouldStop: o.shouldStop)
        let source = NBDSource(client)
        var backing: (any DiskImage)?
        if let b = o.backingFile {
            let loc = try BackingName.locate(b, format: o.backingFormat, relativeTo: target)
            let image = try ImageOpener().open(loc.path, format: loc.format)
            guard image.virtualSize == source.virtualSize else {
                throw QCow2Error.invalidArgument(path: b, detail: "the backing file's size (\(image.virtualSize)) differs from the export's (\(source.virtualSize))")
            }
            backing = image
        }
        if targetExists { try BackupOperation.refuseTargetInChains(target, source: nil, backing: backing) }

        let staged = try StagedFile(final: target)
        defer { staged.discard() }
        let settings = o.copySettings
        var copy: TargetCopy
        do {
            try BackupOperation.createTarget(staged.temporaryPath, size: source.virtualSize, backing: backing, options: o)
            copy = try TargetCopy(source: source, work: staged.temporaryPath, format: .qcow2, targetBacking: backing, settings: settings)
        } catch { throw staged.naming(error) }
        let plan = try self.plan(source, bitmap: o.sync == .incremental ? o.bitmap : nil, unit: copy.unit)
        source.willRead(plan.data)
        do {
            try copy.run(plan, maskZeros: o.sync == .incremental, progress: o.progress)
            try copy.finish()
        } catch { throw staged.naming(error) }
        try beforeCommit()
        try staged.commit(replacing: o.force, durable: true)
        let total = plan.data.reduce(0) { $0 + $1.1 } + plan.zero.reduce(0) { $0 + $1.1 }
        let seconds = Double(monotonicNanoseconds() - started) / 1e9
        return BackupResult(bytesToCopy: total, bytesWritten: copy.engine.bytesCopied, clusters: total / copy.unit, seconds: seconds)
    }

    /// Pull mode copies the whole export or the clusters its bitmap marks; the bitmap is
    /// the server's, so qimg neither creates nor clears one.
    static func validate(uri: String, options o: BackupOptions) throws {
        func invalid(_ m: String) -> QCow2Error { .invalidArgument(path: uri, detail: m) }
        switch o.sync {
        case .full:
            guard o.bitmap == nil else { throw invalid("a full backup of an NBD export takes no bitmap (the server owns its bitmaps)") }
            guard o.backingFile == nil else { throw invalid("a full backup of an NBD export has no backing file") }
        case .incremental: break
        case .top, .bitmap: throw invalid("an NBD export is backed up with sync=full or sync=incremental")
        }
        guard o.sourceFormat == nil else { throw invalid("an NBD export has no image format") }
    }

    /// Full: the data extents. Incremental: the dirty ranges in whole units, split into
    /// what is read (data) and what is written as zeros without reading (units that
    /// `base:allocation` reports as zero or unallocated).
    static func plan(_ source: NBDSource, bitmap: String?, unit: UInt64) throws -> Plan {
        let size = source.virtualSize
        guard let bitmap else {
            return Plan(data: CopyEngine.normalize(try CopyEngine.nonZeroRanges(source), unit: unit, size: size), zero: [])
        }
        let changes = try NBDDirtyChanges(source.client, bitmap: bitmap, granularity: unit)
        var dirty: [(UInt64, UInt64)] = []
        changes.forEachChangedRange { dirty.append(($0, $1)) }
        var plan = Plan(data: [], zero: [])
        for (a, n) in CopyEngine.normalize(dirty, unit: unit, size: size) {
            var zeros: [(UInt64, UInt64)] = []
            try source.forEachExtent(from: a, to: a + n) { start, e in
                guard e.kind != .data else { return }
                // Whole units only (the last one may end with the disk).
                let s = (start + unit - 1) / unit * unit
                let end = start + e.length == size ? size : (start + e.length) / unit * unit
                if end > s { zeros.append((s, end - s)) }
            }
            var pos = a
            for (s, len) in CopyEngine.normalize(zeros, unit: unit, size: size) {
                if s > pos { plan.data.append((pos, s - pos)) }
                plan.zero.append((s, len))
                pos = s + len
            }
            if pos < a + n { plan.data.append((pos, a + n - pos)) }
        }
        return plan
    }
}
