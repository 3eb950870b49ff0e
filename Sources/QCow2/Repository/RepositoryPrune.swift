#if canImport(Glibc)
import Glibc
#endif

/// `qimg repo prune`: the points a `RetentionPolicy` keeps stay; each expired point is
/// merged into the next kept point, which is rewritten to restore exactly what it restored
/// before, under the same id and file name: onto its nearest kept ancestor (holding what
/// differs from it), or as a full (parent none) when it has none. Crash-safe order:
///
/// 1. each rewritten point is written beside it as `<file>.prune` (temporary name, fsync,
///    rename, directory fsync) and its digests read back;
/// 2. the manifest records them (new kind, parent, digests, `replacement`) without the
///    expired points; until step 3 their old files still restore the same bytes through
///    the expired files, which are still there;
/// 3. `<file>.prune` is renamed over the file; the manifest drops `replacement`;
/// 4. the expired points' files are removed.
///
/// A run killed anywhere is finished by the next prune or backup (`finishReplacements`,
/// then the removal of files the manifest does not list).
public enum RepositoryPrune {
    public struct Result: Sendable {
        public var chain: String
        /// The points merged away (their data lives on in the kept points after them).
        public var removed: [String] = []
        /// The oldest rewritten point.
        public var into: String?
        public var bytesCopied: UInt64 = 0
    }

    public static let replacementSuffix = ".prune"

    public static func run(repository repoPath: String, chain: String?, policy: RetentionPolicy) throws -> Result {
        guard !policy.isEmpty else { throw QCow2Error.invalidArgument(path: repoPath, detail: "a retention policy must keep at least one point") }
        let repo = try Repository(repoPath, create: false, lock: .exclusive)
        try finishReplacements(repo)
        let c = try repo.manifest.selectChain(chain, path: repoPath)
        repo.removeUnlisted(chain: c.name)
        var result = Result(chain: c.name)
        let keep = policy.kept(c.points)
        let expired = c.points.filter { !keep.contains($0.id) }
        guard !expired.isEmpty else { return result }
        result.removed = expired.map(\.id)
        // Every kept point whose parent expires is rewritten: onto its nearest kept
        // ancestor (only what differs from it), or as a full when it has none.
        var rewritten: [RepositoryManifest.Point] = []
        for p in c.points where keep.contains(p.id) {
            guard let parent = p.parent, !keep.contains(parent) else { continue }
            let base = repo.manifest.ancestry(of: parent, in: c.name).last { keep.contains($0.id) }
            var q = try rewrite(p, onto: base, repo: repo, copied: &result.bytesCopied)
            q.replacement = p.file + replacementSuffix
            rewritten.append(q)
            result.into = result.into ?? p.id
        }
        let expiredIDs = Set(result.removed)
        try RepositoryBackup.update(repo, c.name) { points in
            points.removeAll { expiredIDs.contains($0.id) }
            for q in rewritten { if let i = points.firstIndex(where: { $0.id == q.id }) { points[i] = q } }
        }
        try finishReplacements(repo)
        repo.removeUnlisted(chain: c.name)
        return result
    }

    /// Writes `<p.file>.prune`: what `p` restores, as an overlay of `base`'s file holding
    /// what differs from it, or standalone; returns `p` as it will be recorded.
    static func rewrite(_ p: RepositoryManifest.Point, onto base: RepositoryManifest.Point?, repo: Repository,
                        copied: inout UInt64) throws -> RepositoryManifest.Point {
        let path = repo.file(p.file)
        var st = stat()
        guard Sys.stat(path, &st) == 0 else { throw QCow2Error.repositoryDamaged(path: path, field: "", detail: "the file of restore point \(p.id) is missing") }
        let source = try ImageOpener().open(path, format: .qcow2)
        let target = path + replacementSuffix
        var o = ConvertOptions()
        o.create.format = .qcow2
        if let base {
            o.backingFile = String(base.file.split(separator: "/").last ?? "")
            o.backingFormat = .qcow2
        }
        try StagedFile.$creationMode.withValue(st.st_mode & 0o666) {
            try ConvertOperation.run(source: source, target: target, options: o)
        }
        let d = try PointDigest.compute(target)
        copied += d.runs.reduce(0) { $0 + $1.length }
        var q = p
        q.kind = base == nil ? .full : .incremental
        q.parent = base?.id
        q.fileSize = d.fileSize
        q.metadataSHA256 = d.metadataSHA256
        q.runs = d.runs
        return q
    }

    /// Renames every recorded replacement over its point's file (when not done yet) and
    /// clears the records.
    static func finishReplacements(_ repo: Repository) throws {
        for (ci, c) in repo.manifest.images.enumerated() {
            for (pi, p) in c.points.enumerated() {
                guard let r = p.replacement else { continue }
                var st = stat()
                if Sys.lstat(repo.file(r), &st) == 0 {
                    guard Sys.rename(repo.file(r), repo.file(p.file)) == 0 else { throw QCow2Error.io(path: repo.file(r), operation: "rename", errno: errno) }
                    try StagedFile.syncDirectory(of: repo.file(p.file))
                }
                repo.manifest.images[ci].points[pi].replacement = nil
                try repo.save()
            }
        }
    }
}
