#if canImport(Glibc)
import Glibc
#endif

/// `REPO/.qimg-prune.json`: a prune's plan, kept beside the manifest for as long as the
/// prune changes files, so that the plan outlives the manifest (deleted by a person, or the
/// directory restored from a copy). Written atomically before any file changes, removed
/// last, after the expired files. While it exists it is the truth about its chain: every
/// opening of the repository applies it to the manifest (`adopt`: the expired points are
/// not listed, each merge is recorded on its kept point), a manifest rebuilt from the files
/// never lists an expired file (a downward merge may have committed a newer point's data
/// into it), and its repository id stands in for a lost id file. The next run that finishes
/// merges (`RepositoryPrune.finishMerges`: prune, backup) finishes the prune and removes it.
struct PruneJournal: Equatable {
    static let fileName = ".qimg-prune.json"
    static let formatName = "qimg-prune-journal"
    static let version: UInt64 = 1
    /// The largest journal read (it names one chain's points: far below this).
    static let maxBytes: UInt64 = 64 << 20

    var repositoryID: String
    var chain: String
    /// The expired points' files, relative to the repository.
    var expired: [String]
    /// The kept points' merges, by point id.
    var merges: [String: PruneMerge]

    /// Step 1 of a prune: the journal durable (temporary file, fsync, rename, directory
    /// fsync), then the manifest that follows it.
    func begin(in repo: Repository) throws {
        try Repository.writeAtomically(json().rendered() + "\n", to: repo.file(Self.fileName), mode: 0o600)
        repo.pruneJournal = self
        _ = repo.manifest.adopt(self)
        try repo.save()
    }

    /// The last step of a prune, once its merges are done: the expired files removed (those
    /// the manifest does not list: nothing else), then the journal, then a directory fsync.
    static func finish(in repo: Repository) throws {
        guard let j = repo.pruneJournal else { return }
        let listed = repo.listedFiles(chain: j.chain)
        _ = repo.remove(j.expired.filter { !listed.contains($0) })
        let p = repo.file(fileName)
        guard Sys.unlink(p) == 0 || errno == ENOENT else { throw QCow2Error.io(path: p, operation: "unlink", errno: errno) }
        try StagedFile.syncDirectory(of: p)
        repo.pruneJournal = nil
    }

    /// The journal in repository directory `repo`, nil when there is none. One that cannot
    /// be read is damage: without it a rebuilt manifest could list expired files.
    static func read(_ repo: String) throws -> PruneJournal? {
        let p = repo + "/" + fileName
        var st = stat()
        guard Sys.lstat(p, &st) == 0 else {
            guard errno == ENOENT else { throw QCow2Error.io(path: p, operation: "open", errno: errno) }
            return nil
        }
        do {
            return try parse(try Repository.readBounded(p, maxBytes: maxBytes))
        } catch let e as FormatError {
            throw QCow2Error.repositoryDamaged(path: p, field: e.field, detail: e.detail)
        }
    }
}

extension RepositoryManifest {
    /// `j`'s plan applied to its chain: the expired points dropped, each merge recorded
    /// (again) on its kept point with the parent and kind it gives. A merge already done
    /// runs again, changing nothing (`PruneMerge` is idempotent). Returns whether anything changed.
    mutating func adopt(_ j: PruneJournal) -> Bool {
        guard let ci = images.firstIndex(where: { $0.name == j.chain }) else { return false }
        let before = images[ci].points
        let expired = Set(j.expired)
        images[ci].points.removeAll { expired.contains($0.file) }
        for i in images[ci].points.indices {
            guard let m = j.merges[images[ci].points[i].id] else { continue }
            images[ci].points[i].merge = m
            images[ci].points[i].parent = m.parent
            images[ci].points[i].kind = m.parent == nil ? .full : .incremental
        }
        return images[ci].points != before
    }
}

// MARK: - JSON

extension PruneJournal {
    func json() -> JSON {
        .object([
            ("format", .string(Self.formatName)), ("version", .uint(Self.version)),
            ("repository-id", .string(repositoryID)), ("image", .string(chain)),
            ("expired", .array(expired.map { .string($0) })),
            ("merges", .array(merges.sorted { $0.key < $1.key }.map { .object([("point", .string($0.key)), ("merge", $0.value.json())]) })),
        ])
    }

    static func parse(_ bytes: [UInt8]) throws -> PruneJournal {
        let j = try JSON.parse(bytes, rules: .manifest)
        let id = try j.repositoryFileID(format: formatName, version: version, what: "prune journal")
        var merges: [String: PruneMerge] = [:]
        for m in try j.field("merges").array() { merges[try m.field("point").string()] = try PruneMerge(json: try m.field("merge")) }
        let journal = PruneJournal(repositoryID: id, chain: try j.field("image").string(),
                                   expired: try j.field("expired").array().map { try $0.string() }, merges: merges)
        for f in journal.expired + merges.values.flatMap(\.files) { try RepositoryManifest.checkInside(f) }
        return journal
    }
}
