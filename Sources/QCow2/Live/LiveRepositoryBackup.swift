#if canImport(Glibc)
import Glibc
#endif

/// `qimg backup --qmp SOCKET --node N1 --node N2 ... --repo DIR --bitmap NAME`: one point
/// per disk of a running VM in a backup repository, with the offline path's chains and
/// bitmap rules (one chain per node or per given chain name; the node's bitmap for a
/// chain is `NAME@<repository id>.<point id>` of its newest point; full or incremental
/// chosen the same way), all disks' jobs started in one transaction, all or none kept.
///
/// Order: targets durable and in place → points recorded pending → each node's bitmap
/// switched to its new point's name (one transaction per node) → points complete. A
/// killed run's pending point is completed or dropped by the next run, as offline.
public enum LiveRepositoryBackup {
    public static func run(socket: String, repository repoPath: String, nodes: [String], chains: [String]?,
                           options o: RepositoryBackupOptions, freeze: GuestFreeze? = nil,
                           qmpTimeout: Double = QMPConnection.defaultReplyTimeout) throws -> [RepositoryBackupResult] {
        let names = chains ?? nodes
        guard names.count == nodes.count else {
            throw QCow2Error.invalidArgument(path: socket, detail: "\(names.count) chain names for \(nodes.count) nodes (one per node, in the same order)")
        }
        guard Set(names).count == names.count else { throw QCow2Error.invalidArgument(path: socket, detail: "two disks would share a chain") }
        for n in names { try RepositoryBackup.validateChainName(n, image: socket) }
        let repo = try Repository(repoPath, create: true, lock: .exclusive, lockWait: o.lockWait)
        try freeze?.connect()
        let qmp = try QMPConnection(socket: socket, replyTimeout: qmpTimeout)
        defer { qmp.close() }
        try LiveCleanup.run(qmp)
        try RepositoryPrune.finishMerges(repo)
        var planned: [Planned] = []
        var cleaned: [String] = []
        for (i, (node, chain)) in zip(nodes, names).enumerated() {
            let (p, c) = try plan(repo, qmp, node: node, chain: chain, number: repo.manifest.nextPoint + UInt64(i), options: o)
            planned.append(p)
            cleaned += c
        }
        var push = PushOptions()
        push.shouldStop = o.shouldStop
        push.freeze = freeze
        push.qmpTimeout = qmpTimeout
        // Point files are never readable by more users than the repository's owner.
        let r = try StagedFile.$creationMode.withValue(0o600) {
            try PushBackup.run(qmp, disks: planned.map(\.disk), options: push) {
                for p in planned { try p.record(repo, state: .pending) }
                repo.manifest.nextPoint += UInt64(planned.count)
                try repo.save()
            }
        }
        for p in planned {
            // The data the point's file holds (as an offline run counts it), not the job's
            // progress: QEMU's counts every byte it went over, zeros and holes included.
            p.point.bytesCopied = p.point.runs.reduce(0) { $0 + $1.length }
            try p.record(repo, state: .complete)
        }
        try repo.save()
        return zip(planned, r.bytesCopied).map { p, processed in
            let backup = BackupResult(bytesToCopy: processed, bytesWritten: p.point.bytesCopied, clusters: 0, seconds: r.seconds)
            return RepositoryBackupResult(chain: p.chain, point: p.point, fullReason: p.reason, backup: backup, cleaned: cleaned)
        }
    }

    /// One disk's point, planned before anything starts.
    final class Planned {
        let chain: String
        var disk: LiveDisk
        var point: RepositoryManifest.Point
        let reason: FullReason?

        init(chain: String, disk: LiveDisk, point: RepositoryManifest.Point, reason: FullReason?) {
            self.chain = chain
            self.disk = disk
            self.point = point
            self.reason = reason
        }

        /// Adds (pending) or updates (complete) the point in the manifest (not saved).
        func record(_ repo: Repository, state: RepositoryManifest.Point.State) throws {
            if state == .pending {
                let digest = try PointDigest.compute(repo.file(point.file))
                point.fileSize = digest.fileSize
                point.metadataSHA256 = digest.metadataSHA256
                point.runs = digest.runs
            }
            point.state = state
            guard let i = repo.manifest.images.firstIndex(where: { $0.name == chain }) else { return }
            if state == .pending { repo.manifest.images[i].points.append(point) } else if !repo.manifest.images[i].points.isEmpty {
                repo.manifest.images[i].points[repo.manifest.images[i].points.count - 1] = point
            }
        }
    }

    static func plan(_ repo: Repository, _ qmp: QMPConnection, node: String, chain: String, number: UInt64,
                     options o: RepositoryBackupOptions) throws -> (Planned, [String]) {
        let live = try LiveNodes.find(node, qmp)
        let dir = repo.file(chain)
        if Sys.mkdir(dir, 0o700) == 0 { try StagedFile.syncDirectory(of: dir) } else if errno != EEXIST {
            throw QCow2Error.io(path: dir, operation: "mkdir", errno: errno)
        }
        if repo.manifest.chain(chain) == nil { repo.manifest.images.append(RepositoryManifest.ImageChain(name: chain)) }
        var cleaned = try RepositoryBackup.resolvePending(repo, chain) { live.bitmap($0) != nil }
        let prefix = "\(o.bitmap)@\(repo.manifest.repositoryID)."
        cleaned += repo.removeLeftovers(chain: chain) { id in live.bitmap(prefix + id) != nil }
        let jobBitmaps = live.bitmaps.filter { $0.name.hasPrefix(prefix) }
        let reason = fullReason(repo, chain, live, jobBitmaps, prefix: prefix, options: o)
        let parent = reason == nil ? repo.manifest.chain(chain)?.points.last : nil
        let id = RepositoryBackup.pointID(number)
        let time = o.time ?? RepositoryTime.now()
        let relative = "\(chain)/\(RepositoryTime.compact(time))-\(id).qcow2"
        var d = LiveDisk(node: live.name, target: repo.file(relative))
        let bitmap = prefix + id
        if let p = parent {
            d.backingFile = String(p.file.split(separator: "/").last ?? "")
            d.backingFormat = .qcow2
            d.sync = .incremental
            d.bitmap = prefix + p.id
            d.renameBitmap = bitmap
        } else {
            d.bitmap = bitmap
        }
        // Other job bitmaps go once the new point's bitmap exists (not busy ones: not ours).
        d.dropBitmaps = jobBitmaps.filter { $0.name != d.bitmap && !$0.busy }.map(\.name)
        let point = RepositoryManifest.Point(
            id: id, file: relative, kind: parent == nil ? .full : .incremental, parent: parent?.id, time: time,
            virtualSize: live.virtualSize, bytesCopied: 0, bitmap: bitmap, state: .pending,
            fileSize: 0, metadataSHA256: "", runs: [])
        return (Planned(chain: chain, disk: d, point: point, reason: reason), cleaned)
    }

    /// nil when an incremental on the chain's newest point is safe, else why not (the
    /// offline rules, with the running node's bitmaps).
    static func fullReason(_ repo: Repository, _ chain: String, _ live: LiveNode, _ bitmaps: [LiveBitmap], prefix: String,
                           options o: RepositoryBackupOptions) -> FullReason? {
        if let reason = RepositoryBackup.chainReason(repo, chain, options: o) { return reason }
        guard let newest = repo.manifest.chain(chain)?.points.last else { return .noChain }
        guard bitmaps.count == 1, bitmaps[0].name == prefix + newest.id else { return .bitmapMissing }
        if bitmaps[0].inconsistent || bitmaps[0].busy { return .bitmapInUse }
        if !bitmaps[0].recording { return .bitmapDisabled }
        if live.virtualSize != newest.virtualSize { return .sizeChanged }
        return nil
    }
}
