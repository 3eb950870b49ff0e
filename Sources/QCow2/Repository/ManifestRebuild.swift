#if canImport(Glibc)
import Glibc
#endif

/// A lost manifest rebuilt from the point files themselves: each chain directory's
/// `<time>-<id>.qcow2` files, linked by their backing file names, digests read anew, under
/// `repositoryID` (the id file's: the image's bitmap of the newest point still belongs to
/// the job, so the next backup continues the chain, or takes a full and removes it). An
/// unfinished prune's `journal` decides for its chain: its expired files are never points
/// (a downward merge may have committed a newer point's data into one), and a kept point it
/// merges gets the parent of its merge, whatever (expired) file it is still backed by.
/// Files left out (an unreadable one, one whose parent is gone) stay: `UnlistedFile`.
extension RepositoryManifest {
    static func rebuild(from repo: String, repositoryID: String, journal: PruneJournal? = nil) throws -> RepositoryManifest {
        var m = RepositoryManifest(repositoryID: repositoryID)
        for dirName in Repository.entries(repo).sorted() where !dirName.hasPrefix(".") {
            var st = stat()
            guard Sys.lstat(repo + "/" + dirName, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else { continue }
            let prune = journal?.chain == dirName ? journal : nil
            let expired = Set(prune?.expired ?? [])
            var chain = ImageChain(name: dirName)
            let named = Repository.entries(repo + "/" + dirName).compactMap { f in pointName(f).map { (f, $0.time, $0.number) } }
            // Past every file's number, listed or not: a file the counter has not reached is
            // a killed backup's, which the next backup removes (`UnlistedFile`).
            m.nextPoint = named.reduce(m.nextPoint) { max($0, $1.2 == .max ? $1.2 : $1.2 + 1) }
            for (file, time, number) in named.sorted(by: { $0.2 < $1.2 }) where !expired.contains(dirName + "/" + file) {
                let relative = dirName + "/" + file
                let id = RepositoryBackup.pointID(number)
                guard let q = try? PointDigest.openAlone(repo + "/" + relative) else { continue }
                var parent: String?
                if let merge = prune?.merges[id] {
                    parent = merge.parent
                } else if let b = q.backingFileName {
                    // A point whose parent is gone cannot be restored: left out, its file kept
                    // (an orphan: listed and reported by verify, never removed).
                    guard let p = chain.points.first(where: { $0.file == dirName + "/" + b }) else { continue }
                    parent = p.id
                }
                guard let d = try? PointDigest.compute(repo + "/" + relative) else { continue }
                chain.points.append(Point(
                    id: id, file: relative, kind: parent == nil ? .full : .incremental, parent: parent,
                    time: time, virtualSize: q.virtualSize, bytesCopied: d.runs.reduce(0) { $0 + $1.length }, bitmap: "",
                    state: .complete, fileSize: d.fileSize, metadataSHA256: d.metadataSHA256, runs: d.runs))
            }
            if !chain.points.isEmpty { m.images.append(chain) }
        }
        return m
    }

    /// `YYYYMMDDTHHMMSSZ-NNNNNN.qcow2`: the time and the point number.
    static func pointName(_ name: String) -> (time: Int64, number: UInt64)? {
        let b = Array(name.utf8)
        guard b.count > 24, name.hasSuffix(".qcow2"), b[8] == UInt8(ascii: "T"), b[15] == UInt8(ascii: "Z"), b[16] == UInt8(ascii: "-") else { return nil }
        let s = { (r: Range<Int>) in String(decoding: b[r], as: UTF8.self) }
        guard let time = RepositoryTime.parse("\(s(0..<4))-\(s(4..<6))-\(s(6..<8))T\(s(9..<11)):\(s(11..<13)):\(s(13..<15))Z"),
              let number = UInt64(s(17..<(b.count - 6))) else { return nil }
        return (time, number)
    }
}
