#if canImport(Glibc)
import Glibc
#endif

/// `qimg repo prune`: the points a `RetentionPolicy` keeps stay; each expired point is
/// merged into the next kept point, which keeps its id and file name and restores exactly
/// what it restored before (`PruneMerge`). A kept point whose parent expires is merged:
///
/// whichever way copies less (`PruneCost`): down (its data and the expired incrementals'
/// above the oldest expired point committed into that point, whose file is renamed over
/// its own: a full, or an incremental on the nearest kept ancestor) or up (what it lacks
/// copied into it from the expired points, backed by the nearest kept ancestor or by
/// nothing).
///
/// Crash-safe order: (0) the plan (`PruneJournal`: the expired files, each merge) is
/// written beside the manifest, so that it outlives a lost manifest; (1) the manifest drops
/// the expired points and records each merge on its kept point; no file has changed, and
/// nothing a listed point reads changes later; (2) each merge runs (idempotent: a commit
/// into an unlisted full, which no listed point reads where it changes; a rebase in place;
/// a rename), then the manifest records the point's new kind, parent and digests; (3) the
/// expired files the journal names are removed (no other file: `UnlistedFile`); (4) the
/// journal is removed. A run killed anywhere is finished by the next prune or backup
/// (`finishMerges`), with or without the manifest.
public enum RepositoryPrune {
    public struct Result: Sendable {
        public var chain: String
        /// The points merged away (their data lives on in the kept points after them).
        public var removed: [String] = []
        public var merges: [Merge] = []
        /// The oldest merged point.
        public var into: String? { merges.first?.point }
        public var bytesCopied: UInt64 { merges.reduce(0) { $0 + $1.bytesCopied } }
    }

    /// One kept point's merge, and what it copies (from the cluster maps).
    public struct Merge: Sendable {
        public var point: String
        public var direction: PruneMerge.Direction
        public var parent: String?
        public var bytesCopied: UInt64
        /// What the other direction would have copied (nil: only one was possible).
        public var otherWay: UInt64?
    }

    /// The temporary files of earlier versions' prunes, removed as leftovers.
    public static let oldReplacementSuffix = ".prune"

    public static func run(repository repoPath: String, chain: String?, policy: RetentionPolicy) throws -> Result {
        guard !policy.isEmpty else { throw QCow2Error.invalidArgument(path: repoPath, detail: "a retention policy must keep at least one point") }
        let repo = try Repository(repoPath, create: false, lock: .exclusive)
        try finishMerges(repo)
        let c = try repo.manifest.selectChain(chain, path: repoPath)
        // A killed backup's file stays for the next backup, which knows the image's bitmaps.
        repo.removeLeftovers(chain: c.name, imageHasBitmap: nil)
        var result = Result(chain: c.name)
        let keep = policy.kept(c.points)
        let expired = Set(c.points.map(\.id)).subtracting(keep)
        guard !expired.isEmpty else { return result }
        result.removed = c.points.map(\.id).filter { expired.contains($0) }
        var planned: [String: PruneMerge] = [:]
        for p in c.points where keep.contains(p.id) {
            guard let parent = p.parent, !keep.contains(parent) else { continue }
            let (merge, report) = try plan(p, below: repo.manifest.ancestry(of: parent, in: c.name), keep: keep, repo: repo)
            planned[p.id] = merge
            result.merges.append(report)
        }
        let journal = PruneJournal(repositoryID: repo.manifest.repositoryID, chain: c.name,
                                   expired: c.points.filter { expired.contains($0.id) }.map(\.file), merges: planned)
        try journal.begin(in: repo)
        try finishMerges(repo)
        return result
    }

    /// How kept point `p` absorbs the expired points of `below` (its parent's ancestry,
    /// oldest first) above its nearest kept ancestor.
    static func plan(_ p: RepositoryManifest.Point, below: [RepositoryManifest.Point], keep: Set<String>,
                     repo: Repository) throws -> (PruneMerge, Merge) {
        let baseIndex = below.lastIndex { keep.contains($0.id) }
        let base = baseIndex.map { below[$0] }
        let absorbed = Array(below[(baseIndex.map { $0 + 1 } ?? 0)...])
        let layers = try ([p] + absorbed.reversed()).map { try openLayer($0, mergedInto: p, repo: repo) }
        let up = try PruneCost.dataBytes(layers, from: 1)
        let files = absorbed.map(\.file)
        // Down commits into the oldest expired point (a full without a kept ancestor, else
        // an incremental on the kept ancestor), whose file then becomes the point's.
        guard let bottom = absorbed.first, bottom.parent == base?.id, (base != nil || bottom.kind == .full) else {
            return (PruneMerge(direction: .up, parent: base?.id, files: files),
                    Merge(point: p.id, direction: .up, parent: base?.id, bytesCopied: up))
        }
        let down = try PruneCost.dataBytes(Array(layers.dropLast()), from: 0)
        let direction: PruneMerge.Direction = down < up ? .down : .up
        return (PruneMerge(direction: direction, parent: base?.id, files: files),
                Merge(point: p.id, direction: direction, parent: base?.id, bytesCopied: min(down, up), otherWay: max(down, up)))
    }

    /// A file a merge reads; a point whose file is missing is damage (before any change).
    static func openLayer(_ q: RepositoryManifest.Point, mergedInto p: RepositoryManifest.Point, repo: Repository) throws -> QCow2Image {
        do {
            return try PointDigest.openAlone(repo.file(q.file))
        } catch QCow2Error.io(let path, _, let e) where e == ENOENT {
            throw QCow2Error.repositoryDamaged(path: path, field: "", detail: "the file of point \(q.id) is missing; merging point \(p.id) needs it (repo verify)")
        }
    }

    /// Finishes every merge the manifest records, oldest point first: the file changed as
    /// recorded (again, when a killed run did it already), then its new kind, parent and
    /// digests recorded; then an unfinished prune's last steps (`PruneJournal.finish`).
    static func finishMerges(_ repo: Repository) throws {
        for ci in repo.manifest.images.indices {
            for pi in repo.manifest.images[ci].points.indices {
                let p = repo.manifest.images[ci].points[pi]
                guard let m = p.merge else { continue }
                let parentFile = try m.parent.map { id in
                    guard let q = repo.manifest.images[ci].points.first(where: { $0.id == id }) else {
                        throw m.damaged(repo.file(p.file), p, "is to be merged onto point \(id), which the manifest does not list")
                    }
                    return q.file
                }
                let d = try m.perform(on: p, parentFile: parentFile, repo: repo)
                var q = p
                q.kind = m.parent == nil ? .full : .incremental
                q.parent = m.parent
                q.fileSize = d.fileSize
                q.metadataSHA256 = d.metadataSHA256
                q.runs = d.runs
                q.merge = nil
                repo.manifest.images[ci].points[pi] = q
                try repo.save()
            }
        }
        try PruneJournal.finish(in: repo)
    }
}
