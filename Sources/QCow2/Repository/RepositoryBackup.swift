#if canImport(Glibc)
import Glibc
#endif

public struct RepositoryBackupOptions {
    public enum FullEvery: Equatable, Sendable { case points(UInt64), days(UInt64) }
    /// NAME: the job's bitmaps are `NAME@<repository id>.<point id>`.
    public var bitmap: String
    /// The chain's name (default: the image's file name).
    public var chain: String?
    /// The point's recorded time (default: now).
    public var time: Int64?
    public var fullEvery: FullEvery?
    /// How long to wait for another run's lock, in seconds (nil: `Repository.lockWait`).
    public var lockWait: Double?
    public var progress: ((UInt64, UInt64) -> Void)?
    public var shouldStop: () -> Bool = { false }
    public init(bitmap: String) { self.bitmap = bitmap }
}

/// Why a full backup was taken instead of an incremental.
public enum FullReason: String, Sendable {
    case noChain = "no chain"
    case bitmapMissing = "bitmap missing"
    case bitmapInUse = "bitmap in use"
    /// Disabled bitmaps record nothing.
    case bitmapDisabled = "bitmap disabled"
    case sizeChanged = "size changed"
    case newestPointMissing = "newest point missing or replaced"
    case policy = "policy"
}

public struct RepositoryBackupResult: Sendable {
    public var chain: String
    public var point: RepositoryManifest.Point
    /// nil for an incremental.
    public var fullReason: FullReason?
    public var backup: BackupResult
    /// What earlier, killed runs left and this one removed (relative names).
    public var cleaned: [String]
    /// Whether the runs' digests are the ones computed during the copy (else read anew).
    var digestsFromCopy = false
}

/// `qimg backup --repo`: chooses full or incremental by itself, from what the manifest
/// recorded and the bitmaps the image holds; see Docs/backup.md for the order of a run.
public enum RepositoryBackup {
    public static func run(repository repoPath: String, image: String, options o: RepositoryBackupOptions) throws -> RepositoryBackupResult {
        let chainName = o.chain ?? String(image.split(separator: "/").last ?? Substring(image))
        try validateChainName(chainName, image: image)
        var st = stat()
        guard Sys.stat(image, &st) == 0 else { throw QCow2Error.io(path: image, operation: "open", errno: errno) }
        let mode = st.st_mode & 0o666
        let repo = try Repository(repoPath, create: true, lock: .exclusive, lockWait: o.lockWait)
        let source = try SourceHold(image)
        let dir = repo.file(chainName)
        if Sys.mkdir(dir, 0o700) == 0 { try StagedFile.syncDirectory(of: dir) } else if errno != EEXIST {
            throw QCow2Error.io(path: dir, operation: "mkdir", errno: errno)
        }
        if repo.manifest.chain(chainName) == nil {
            repo.manifest.images.append(RepositoryManifest.ImageChain(name: chainName))
        }
        let prefix = "\(o.bitmap)@\(repo.manifest.repositoryID)."
        try RepositoryPrune.finishMerges(repo)
        let hasBitmap = { (name: String) in source.bitmaps.contains { $0.name == name } }
        var cleaned = try resolvePending(repo, chainName, hasBitmap: hasBitmap)
        // A killed run's point file: recorded when the switch was made, else removed below
        // (`UnlistedFile.Reason.killedBackup`); any other unlisted file is kept.
        let unrecorded = try UnrecordedPoints(repo, chain: chainName, prefix: prefix, hasBitmap: hasBitmap)
        cleaned += repo.removeLeftovers(chain: chainName) { id in hasBitmap(prefix + id) }
        cleaned += repo.removeDeadTemporaries(chain: chainName)
        let chain = repo.manifest.chain(chainName)?.points ?? []
        // A live run's hold bitmap stored by a QEMU that quit mid-run holds bits the job
        // bitmap lost: it makes this run a full one (and goes with the other job bitmaps).
        let jobBitmaps = source.bitmaps.filter { $0.name.hasPrefix(prefix) || $0.name.hasPrefix(LiveNames.hold(prefix)) }
        let reason = fullReason(repo, chainName, bitmaps: jobBitmaps, prefix: prefix, source: source, options: o)
        let parent = reason == nil ? chain.last : nil

        // Past every point the image has a bitmap of (a rebuilt manifest may not know them).
        let number = jobBitmaps.compactMap { UInt64($0.name.dropFirst(prefix.count)) }
            .reduce(max(repo.manifest.nextPoint, unrecorded.nextNumber)) { max($0, $1 == .max ? $1 : $1 + 1) }
        let id = pointID(number)
        let time = o.time ?? RepositoryTime.now()
        let relative = "\(chainName)/\(RepositoryTime.compact(time))-\(id).qcow2"
        var b = BackupOptions()
        if let p = parent {
            b.sync = .bitmap
            b.bitmap = jobBitmaps.first?.name
            b.bitmapMode = .never
            b.backingFile = String(p.file.split(separator: "/").last ?? "")
            b.backingFormat = .qcow2
        }
        b.progress = o.progress
        b.shouldStop = o.shouldStop
        // The runs are hashed on another core from the bytes the copy writes.
        let hasher = try CopiedRunHasher()
        b.observer = hasher
        let r = try StagedFile.$creationMode.withValue(mode) {
            try BackupOperation.run(source: image, target: repo.file(relative), options: b)
        }
        // The point is durable (synced, renamed, its directory synced): the image's bitmaps
        // switch to it, then the manifest records it, complete, in its one write of the run.
        // A run killed in between leaves an unrecorded point file (`UnrecordedPoints`).
        let (digest, fromCopy) = try PointDigest.compute(repo.file(relative), copied: hasher.finish())
        let point = RepositoryManifest.Point(
            id: id, file: relative, kind: parent == nil ? .full : .incremental, parent: parent?.id, time: time,
            virtualSize: source.image.virtualSize, bytesCopied: r.bytesWritten, bitmap: prefix + id, state: .complete,
            fileSize: digest.fileSize, metadataSHA256: digest.metadataSHA256, runs: digest.runs)
        try source.switchBitmaps(add: point.bitmap, granularity: jobBitmaps.first?.granularity, remove: jobBitmaps.map(\.name))
        repo.manifest.nextPoint = number == .max ? number : number + 1
        try update(repo, chainName) { $0.append(point) }
        return RepositoryBackupResult(chain: chainName, point: point, fullReason: reason, backup: r, cleaned: cleaned,
                                      digestsFromCopy: fromCopy)
    }

    /// Point ids: the repository's point counter, zero-padded (unique, sortable, short).
    static func pointID(_ n: UInt64) -> String {
        let s = String(n)
        return String(repeating: "0", count: max(0, 6 - s.count)) + s
    }

    static func validateChainName(_ name: String, image: String) throws {
        guard !name.isEmpty, name != ".", name != "..", !name.contains("/"), !name.hasPrefix("."),
              name != RepositoryManifest.fileName, name != RepositoryID.fileName else {
            throw QCow2Error.invalidArgument(path: image, detail: "'\(name)' cannot name a chain (a directory of the repository)")
        }
    }

    /// Changes chain `name`'s points and writes the manifest.
    static func update(_ repo: Repository, _ name: String, _ body: (inout [RepositoryManifest.Point]) -> Void) throws {
        guard let i = repo.manifest.images.firstIndex(where: { $0.name == name }) else { return }
        body(&repo.manifest.images[i].points)
        try repo.save()
    }

    /// A newest point left pending by a killed run: complete if the image switched to its
    /// bitmap, else removed (manifest first, then its file). The image may have been used
    /// since, with the old bitmap recording: switching now could lose those changes.
    /// `hasBitmap`: whether the image (or the running VM's node) has a bitmap of that name.
    static func resolvePending(_ repo: Repository, _ name: String, hasBitmap: (String) -> Bool) throws -> [String] {
        guard let last = repo.manifest.chain(name)?.points.last, last.state == .pending else { return [] }
        if hasBitmap(last.bitmap) {
            try update(repo, name) { $0[$0.count - 1].state = .complete }
            return []
        }
        try update(repo, name) { $0.removeLast() }
        _ = Sys.unlink(repo.file(last.file))
        try StagedFile.syncDirectory(of: repo.file(last.file))
        return [last.file]
    }

    /// nil when an incremental on the newest point is safe, else why not.
    static func fullReason(_ repo: Repository, _ name: String, bitmaps: [BitmapDirectoryEntry], prefix: String,
                           source: SourceHold, options o: RepositoryBackupOptions) -> FullReason? {
        if let reason = chainReason(repo, name, options: o) { return reason }
        guard let newest = repo.manifest.chain(name)?.points.last else { return .noChain }
        guard bitmaps.count == 1, bitmaps[0].name == prefix + newest.id else { return .bitmapMissing }
        if bitmaps[0].inUse { return .bitmapInUse }
        if !bitmaps[0].isAuto { return .bitmapDisabled }
        if source.image.virtualSize != newest.virtualSize { return .sizeChanged }
        return nil
    }

    /// nil when the chain allows an incremental on its newest point (the policy, the
    /// files), whatever the image's bitmaps; else why not.
    static func chainReason(_ repo: Repository, _ name: String, options o: RepositoryBackupOptions) -> FullReason? {
        let chain = repo.manifest.chain(name)?.points ?? []
        guard let newest = chain.last else { return .noChain }
        if let policy = o.fullEvery, let full = chain.lastIndex(where: { $0.kind == .full }) {
            switch policy {
            case .points(let n): if UInt64(chain.count - full) >= n { return .policy }
            case .days(let n): if (o.time ?? RepositoryTime.now()) - chain[full].time >= Int64(clamping: n) * 86400 { return .policy }
            }
        }
        // Every file of the newest point's chain present, the newest one as recorded.
        for p in repo.manifest.ancestry(of: newest.id, in: name) {
            var st = stat()
            guard Sys.stat(repo.file(p.file), &st) == 0, UInt64(st.st_size) == p.fileSize else { return .newestPointMissing }
        }
        guard let id = try? PointDigest.identity(repo.file(newest.file)),
              id.fileSize == newest.fileSize, id.metadataSHA256 == newest.metadataSHA256 else { return .newestPointMissing }
        return nil
    }
}
