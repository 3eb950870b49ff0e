#if canImport(Glibc)
import Glibc
#endif

/// A backup repository directory: `qimg-repository.json` (the manifest),
/// `qimg-repository.id` (the repository id again: a rebuilt manifest keeps it), `.lock`
/// (held for a run: exclusive by a backup, shared by readers) and one directory per chain.
public final class Repository {
    public enum LockKind: Sendable { case shared, exclusive }

    /// How long `init` waits for another run's lock, in seconds, when its caller gives no
    /// wait (the CLI sets it for a whole command: prune, verify, restore and list too).
    @TaskLocal public static var lockWait: Double = 0

    public let path: String
    public var manifest: RepositoryManifest
    /// An unfinished prune's plan (`PruneJournal`), nil when there is none.
    var pruneJournal: PruneJournal?
    private var lockFD: Int32 = -1

    /// The largest manifest read (a bound on memory, not a limit of practice).
    static let maxManifestBytes: UInt64 = 512 << 20

    public var manifestPath: String { file(RepositoryManifest.fileName) }

    /// A path inside the repository.
    public func file(_ relative: String) -> String { path + "/" + relative }

    /// Opens (with `create`, creates: mode 0700) the repository at `path`, refuses a
    /// directory other users can write, and takes its lock, waiting at most `lockWait`
    /// seconds (default: `Repository.lockWait`) for another run to release it.
    public init(_ path: String, create: Bool, lock: LockKind, lockWait: Double? = nil) throws {
        self.path = path.count > 1 && path.hasSuffix("/") ? String(path.dropLast()) : path
        var st = stat()
        if Sys.stat(self.path, &st) != 0 {
            guard errno == ENOENT else { throw QCow2Error.io(path: path, operation: "open", errno: errno) }
            guard create else { throw QCow2Error.invalidArgument(path: path, detail: "no such repository directory") }
            guard Sys.mkdir(self.path, 0o700) == 0 || errno == EEXIST else { throw QCow2Error.io(path: path, operation: "mkdir", errno: errno) }
            try StagedFile.syncDirectory(of: self.path)
            guard Sys.stat(self.path, &st) == 0 else { throw QCow2Error.io(path: path, operation: "open", errno: errno) }
        }
        guard (st.st_mode & S_IFMT) == S_IFDIR else { throw QCow2Error.invalidArgument(path: path, detail: "not a directory") }
        guard st.st_mode & 0o022 == 0 else {
            let mode = String(st.st_mode & 0o7777, radix: 8)
            throw QCow2Error.invalidArgument(path: path, detail: "the repository directory is writable by other users (mode 0\(mode)): they could replace backups; make it 0700")
        }
        manifest = RepositoryManifest(repositoryID: "")
        try takeLock(lock, wait: lockWait ?? Self.lockWait)
        pruneJournal = try PruneJournal.read(self.path)
        try loadManifest(create: create, lock: lock)
    }

    /// The manifest read, made (an empty directory being created) or rebuilt (lost), then
    /// an unfinished prune's journal applied to it; written when it changed and the lock is
    /// exclusive.
    private func loadManifest(create: Bool, lock: LockKind) throws {
        var mst = stat()
        let storedID = RepositoryID.read(file(RepositoryID.fileName))
        var changed = false
        if Sys.stat(manifestPath, &mst) == 0 {
            manifest = try Self.readManifest(manifestPath)
            try checkJournal(belongsTo: manifest.repositoryID)
            // A repository made before the id file, or an id file lost: written again.
            if lock == .exclusive && storedID != manifest.repositoryID { try RepositoryID.write(manifest.repositoryID, to: file(RepositoryID.fileName)) }
        } else if create && Self.isEmptyDirectory(path) {
            // The id file first: a run killed before the manifest leaves an empty repository.
            manifest = RepositoryManifest(repositoryID: storedID ?? Self.randomID())
            if storedID == nil { try RepositoryID.write(manifest.repositoryID, to: file(RepositoryID.fileName)) }
            changed = true
        } else {
            // Lost: rebuilt from the point files (and written by a backup or prune), under the
            // id file's id (else the prune journal's), so that the image's bitmaps still
            // belong to the job.
            if let storedID { try checkJournal(belongsTo: storedID) }
            manifest = try RepositoryManifest.rebuild(from: path, repositoryID: storedID ?? pruneJournal?.repositoryID ?? Self.randomID(),
                                                      journal: pruneJournal)
            guard !manifest.images.isEmpty else {
                throw QCow2Error.repositoryDamaged(path: manifestPath, field: "", detail: "no manifest and no point file: not a qimg backup repository")
            }
            if lock == .exclusive && storedID == nil { try RepositoryID.write(manifest.repositoryID, to: file(RepositoryID.fileName)) }
            changed = true
        }
        if let j = pruneJournal, manifest.adopt(j) { changed = true }
        if changed && lock == .exclusive { try save(mode: 0o600) }
    }

    /// A prune journal of another repository (a file copied in from elsewhere) must not
    /// decide which of this one's points are listed or removed: damage, before any write.
    private func checkJournal(belongsTo id: String) throws {
        guard let j = pruneJournal, j.repositoryID != id else { return }
        throw QCow2Error.repositoryDamaged(path: file(PruneJournal.fileName), field: "repository-id",
                                           detail: "the prune journal is of repository \(j.repositoryID), not of this one (\(id))")
    }

    deinit { if lockFD >= 0 { close(lockFD) } }

    private func takeLock(_ kind: LockKind, wait: Double) throws {
        let p = file(".lock")
        let fd = Sys.open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw QCow2Error.io(path: p, operation: "open", errno: errno) }
        lockFD = fd
        let deadline = monotonicNanoseconds() + UInt64(max(0, wait) * 1e9)
        while flock(fd, (kind == .exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB) != 0 {
            guard errno == EWOULDBLOCK || errno == EINTR else { throw QCow2Error.io(path: p, operation: "lock", errno: errno) }
            guard monotonicNanoseconds() < deadline else { throw QCow2Error.repositoryLocked(path: path) }
            var ts = timespec(tv_sec: 0, tv_nsec: 100_000_000)
            nanosleep(&ts, nil)
        }
    }

    static func readManifest(_ p: String) throws -> RepositoryManifest {
        do {
            return try RepositoryManifest.parse(try readBounded(p, maxBytes: maxManifestBytes))
        } catch let e as FormatError {
            throw QCow2Error.repositoryDamaged(path: p, field: e.field, detail: e.detail)
        }
    }

    /// A small file of the repository, whole; larger than `maxBytes` is damage.
    static func readBounded(_ p: String, maxBytes: UInt64) throws -> [UInt8] {
        let f = try BlockFile(path: p)
        let size = try f.size()
        guard size <= maxBytes else { throw QCow2Error.repositoryDamaged(path: p, field: "", detail: "larger than \(maxBytes) bytes") }
        return try f.read(count: Int(size), at: 0)
    }

    /// Writes the manifest atomically: a temporary file, fsync, rename, directory fsync.
    public func save(mode: mode_t = 0o600) throws {
        try Self.writeAtomically(manifest.json().rendered() + "\n", to: manifestPath, mode: mode)
    }

    /// A small file written atomically: a temporary file, fsync, rename, directory fsync.
    static func writeAtomically(_ text: String, to path: String, mode: mode_t) throws {
        try StagedFile.$creationMode.withValue(mode) {
            let staged = try StagedFile(final: path)
            defer { staged.discard() }
            let f = try BlockFile(path: staged.temporaryPath, writable: true)
            try f.write(Array(text.utf8), at: 0)
            try f.fullSync()
            try staged.commit(replacing: true, durable: true)
        }
    }

    /// Removes the temporary files dead runs left in chain `name`'s directory (a live
    /// run's stay: `StagedFile` tells them apart). Returns the relative names removed.
    public func removeDeadTemporaries(chain name: String) -> [String] {
        let temporaries = { Set(Self.entries(self.file(name)).filter { $0.hasSuffix(StagedFile.temporarySuffix) }) }
        let before = temporaries()
        guard !before.isEmpty else { return [] }
        StagedFile.removeDeadLeftovers(besides: file(name) + "/")
        return before.subtracting(temporaries()).sorted().map { "\(name)/\($0)" }
    }

    static func isEmptyDirectory(_ p: String) -> Bool {
        entries(p).allSatisfy { $0 == ".lock" || $0 == RepositoryID.fileName || $0.hasSuffix(StagedFile.temporarySuffix) }
    }

    /// The names in directory `p` (without . and ..).
    static func entries(_ p: String) -> [String] {
        guard let d = Sys.opendir(p) else { return [] }
        defer { closedir(d) }
        var out: [String] = []
        while let e = readdir(d) {
            let n = Sys.name(of: e)
            if n != "." && n != ".." { out.append(n) }
        }
        return out
    }

    static func randomID() -> String {
        let v = UInt32.random(in: 0...UInt32.max)
        let h = String(v, radix: 16)
        return String(repeating: "0", count: 8 - h.count) + h
    }
}
