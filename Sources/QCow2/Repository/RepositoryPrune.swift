#if canImport(Glibc)
import Glibc
#endif

/// `qimg repo prune --keep N`: the newest N points of a chain are kept; the older ones are
/// merged into the oldest kept point, which becomes a full (parent none) restoring exactly
/// what it restored before, under the same id and file name. Crash-safe order:
///
/// 1. the merged point is written beside it as `<file>.prune` (temporary name, fsync,
///    rename, directory fsync) and its digests read back;
/// 2. the manifest records it (full, new digests, `replacement`) without the expired
///    points; until step 3 its old file still restores the same bytes through the
///    expired files, which are still there;
/// 3. `<file>.prune` is renamed over the file; the manifest drops `replacement`;
/// 4. the expired points' files are removed.
///
/// A run killed anywhere is finished by the next prune or backup (`finishReplacements`,
/// then the removal of files the manifest does not list).
public enum RepositoryPrune {
    public struct Result: Sendable {
        public var chain: String
        /// The points merged away (their data lives on in `into`).
        public var removed: [String] = []
        public var into: String?
        public var bytesCopied: UInt64 = 0
    }

    public static let replacementSuffix = ".prune"

    public static func run(repository repoPath: String, chain: String?, keep: Int) throws -> Result {
        guard keep >= 1 else { throw QCow2Error.invalidArgument(path: repoPath, detail: "at least one point must be kept") }
        let repo = try Repository(repoPath, create: false, lock: .exclusive)
        try finishReplacements(repo)
        let c = try repo.manifest.selectChain(chain, path: repoPath)
        repo.removeUnlisted(chain: c.name)
        var result = Result(chain: c.name)
        let points = c.points
        guard points.count > keep else { return result }
        let expired = Array(points.prefix(points.count - keep))
        var kept = points[points.count - keep]
        result.removed = expired.map(\.id)
        result.into = kept.id
        if kept.kind == .incremental {
            let replacement = kept.file + replacementSuffix
            let target = repo.file(replacement)
            let source = try ImageOpener().open(repo.file(kept.file), format: .qcow2)
            var st = stat()
            guard Sys.stat(repo.file(kept.file), &st) == 0 else { throw QCow2Error.io(path: repo.file(kept.file), operation: "stat", errno: errno) }
            var o = ConvertOptions()
            o.create.format = .qcow2
            try StagedFile.$creationMode.withValue(st.st_mode & 0o666) {
                try ConvertOperation.run(source: source, target: target, options: o)
            }
            let d = try PointDigest.compute(target)
            result.bytesCopied = d.runs.reduce(0) { $0 + $1.length }
            kept.kind = .full
            kept.parent = nil
            kept.fileSize = d.fileSize
            kept.metadataSHA256 = d.metadataSHA256
            kept.runs = d.runs
            kept.replacement = replacement
        }
        let expiredIDs = Set(result.removed)
        try RepositoryBackup.update(repo, c.name) { points in
            points.removeAll { expiredIDs.contains($0.id) }
            if let i = points.firstIndex(where: { $0.id == kept.id }) { points[i] = kept }
        }
        try finishReplacements(repo)
        repo.removeUnlisted(chain: c.name)
        return result
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
