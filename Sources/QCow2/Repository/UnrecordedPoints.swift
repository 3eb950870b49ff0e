#if canImport(Glibc)
import Glibc
#endif

/// A point file the manifest never recorded. An offline backup renames its point into
/// place (file and directory synced), switches the image's bitmaps, and only then writes
/// the manifest, once (Docs/backup.md). A run killed between the rename and that write
/// leaves a file whose id is at or past the manifest's next point (no recorded run used
/// it); the image's bitmaps tell what happened:
/// - the image holds the point's bitmap: the switch was made, the bitmap records the
///   changes since this point, so the point is recorded here (complete, digests read from
///   the file, as a rebuild reads them);
/// - it does not: the switch was never made, the image's bitmap still records every change
///   since the newest recorded point; `Repository.removeLeftovers` removes the file when it
///   is certainly that run's (`UnlistedFile.Reason.killedBackup`), and keeps it otherwise.
/// No file is removed here; a file that cannot be recorded stays, an orphan.
struct UnrecordedPoints {
    /// Past every id an unrecorded file used (ids are never given twice).
    var nextNumber: UInt64 = 0

    /// Resolves chain `name`'s unrecorded point files; `hasBitmap` answers whether the
    /// image holds a bitmap of that name (the job's bitmaps are `prefix` + point id).
    init(_ repo: Repository, chain name: String, prefix: String, hasBitmap: (String) -> Bool) throws {
        let known = repo.listedFiles(chain: name)
        let files = Repository.entries(repo.file(name)).compactMap { f in
            RepositoryManifest.pointName(f).map { (file: "\(name)/\(f)", time: $0.time, number: $0.number) }
        }.filter { $0.number >= repo.manifest.nextPoint && !known.contains($0.file) }.sorted { $0.number < $1.number }
        for f in files {
            let next = f.number == .max ? f.number : f.number + 1
            nextNumber = max(nextNumber, next)
            let id = RepositoryBackup.pointID(f.number)
            if hasBitmap(prefix + id), let point = Self.point(repo, name, f.file, id: id, time: f.time, bitmap: prefix + id) {
                repo.manifest.nextPoint = max(repo.manifest.nextPoint, next)
                try RepositoryBackup.update(repo, name) { $0.append(point) }
            }
        }
    }

    /// The point file `file` as the manifest records it, when it is the newest point's
    /// incremental (or a full); nil when it cannot be read or names another parent.
    static func point(_ repo: Repository, _ name: String, _ file: String, id: String, time: Int64,
                      bitmap: String) -> RepositoryManifest.Point? {
        guard let q = try? PointDigest.openAlone(repo.file(file)) else { return nil }
        let newest = repo.manifest.chain(name)?.points.last
        let parent: RepositoryManifest.Point?
        if let b = q.backingFileName {
            guard let n = newest, n.file == "\(name)/\(b)", n.virtualSize == q.virtualSize else { return nil }
            parent = n
        } else {
            parent = nil
        }
        guard let d = try? PointDigest.compute(repo.file(file)) else { return nil }
        return RepositoryManifest.Point(
            id: id, file: file, kind: parent == nil ? .full : .incremental, parent: parent?.id, time: time,
            virtualSize: q.virtualSize, bytesCopied: d.runs.reduce(0) { $0 + $1.length }, bitmap: bitmap,
            state: .complete, fileSize: d.fileSize, metadataSHA256: d.metadataSHA256, runs: d.runs)
    }
}
