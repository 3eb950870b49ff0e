#if canImport(Glibc)
import Glibc
#endif

/// `qimg repo verify`: every file of the selected points present, linked to its parent
/// and of the recorded size, clean for `check`, and holding exactly the data runs the
/// manifest recorded (SHA-256 of each); and no orphaned file (`UnlistedFile`) beside them.
public enum RepositoryVerify {
    public struct Problem: Equatable, Sendable {
        public var chain: String
        public var point: String
        public var file: String
        /// The guest offset of the data run that differs, when the problem is in data.
        public var offset: UInt64?
        public var detail: String
    }

    public struct Report: Sendable {
        public var pointsChecked = 0
        public var bytesRead: UInt64 = 0
        public var problems: [Problem] = []
        /// The qcow2 files of the checked chains that are no listed point and no leftover
        /// qimg removes (`UnlistedFile`): damage, reported, never removed. None for `point`.
        public var orphans: [UnlistedFile] = []
        public var isClean: Bool { problems.isEmpty && orphans.isEmpty }
    }

    /// `point` means that point's whole chain (it and its ancestors).
    public static func run(repository repoPath: String, chain: String?, point: String?) throws -> Report {
        let repo = try Repository(repoPath, create: false, lock: .shared)
        let chains = chain != nil || point != nil ? [try repo.manifest.selectChain(chain, path: repoPath)] : repo.manifest.images
        var report = Report()
        if point == nil { report.orphans = repo.unlistedFiles(chain: chain != nil ? chains.first?.name : nil).filter { !$0.isLeftover } }
        for c in chains {
            var points = c.points
            if let point {
                guard c.points.contains(where: { $0.id == point }) else {
                    throw QCow2Error.invalidArgument(path: repoPath, detail: "chain '\(c.name)' has no restore point '\(point)'")
                }
                points = repo.manifest.ancestry(of: point, in: c.name)
            }
            for p in points {
                report.pointsChecked += 1
                let problems = verify(p, in: c, repo: repo, bytesRead: &report.bytesRead)
                report.problems += problems.map { Problem(chain: c.name, point: p.id, file: p.file, offset: $0.0, detail: $0.1) }
            }
        }
        return report
    }

    static func verify(_ p: RepositoryManifest.Point, in c: RepositoryManifest.ImageChain, repo: Repository,
                       bytesRead: inout UInt64) -> [(UInt64?, String)] {
        let path = repo.file(p.file)
        var st = stat()
        guard Sys.stat(path, &st) == 0 else { return [(nil, "the file is missing")] }
        var out: [(UInt64?, String)] = []
        if UInt64(st.st_size) != p.fileSize { out.append((nil, "the file is \(st.st_size) bytes, \(p.fileSize) were recorded (truncated or replaced)")) }
        let q: QCow2Image
        do {
            q = try PointDigest.openAlone(path)
        } catch {
            return out + [(nil, "cannot be opened: \((error as? QCow2Error)?.message ?? "\(error)")")]
        }
        if q.virtualSize != p.virtualSize { out.append((nil, "virtual size \(q.virtualSize), \(p.virtualSize) recorded")) }
        out += backingProblems(q, p, in: c, repo: repo)
        do {
            let r = try CheckOperation.run(q, report: { _ in })
            if r.corruptions > 0 || r.leaks > 0 || r.checkErrors > 0 {
                out.append((nil, "check finds \(r.corruptions) corruptions, \(r.leaks) leaked clusters, \(r.checkErrors) errors"))
            }
            let d = PointDigest(fileSize: 0, metadataSHA256: try PointDigest.metadataDigest(q), runs: try PointDigest.dataRuns(q))
            bytesRead += d.runs.reduce(0) { $0 + $1.length }
            if d.metadataSHA256 != p.metadataSHA256 { out.append((nil, "the metadata (header, L1/L2 tables) differs from what was recorded")) }
            out += runProblems(recorded: p.runs, found: d.runs)
        } catch {
            out.append((nil, "cannot be read: \((error as? QCow2Error)?.message ?? "\(error)")"))
        }
        return out
    }

    static func backingProblems(_ q: QCow2Image, _ p: RepositoryManifest.Point, in c: RepositoryManifest.ImageChain,
                                repo: Repository) -> [(UInt64?, String)] {
        guard let parentID = p.parent else {
            return q.backingFileName == nil ? [] : [(nil, "a full point with a backing file ('\(q.backingFileName ?? "")')")]
        }
        guard let parent = c.points.first(where: { $0.id == parentID }) else { return [(nil, "its parent \(parentID) is not in the manifest")] }
        let name = String(parent.file.split(separator: "/").last ?? "")
        guard q.backingFileName == name else {
            return [(nil, "backing file '\(q.backingFileName ?? "none")', expected '\(name)' (point \(parentID))")]
        }
        var st = stat()
        let resolved = BackingName.fullName(name, relativeTo: repo.file(p.file))
        guard Sys.stat(resolved, &st) == 0 else { return [(nil, "its backing file '\(name)' (point \(parentID)) is missing")] }
        if parent.virtualSize != p.virtualSize { return [(nil, "its parent \(parentID) has another virtual size")] }
        return []
    }

    /// Every recorded run found with the same digest, and no run that was not recorded.
    static func runProblems(recorded: [RepositoryManifest.DataRun], found: [RepositoryManifest.DataRun]) -> [(UInt64?, String)] {
        var byOffset: [UInt64: RepositoryManifest.DataRun] = [:]
        for r in found { byOffset[r.offset] = r }
        var out: [(UInt64?, String)] = []
        for r in recorded {
            guard let f = byOffset.removeValue(forKey: r.offset), f.length == r.length else {
                out.append((r.offset, "the data run of \(r.length) bytes at guest offset \(r.offset) is missing or has another length"))
                continue
            }
            if f.sha256 != r.sha256 { out.append((r.offset, "the data at guest offset \(r.offset) (\(r.length) bytes) differs from what was recorded (SHA-256)")) }
        }
        for f in byOffset.values.sorted(by: { $0.offset < $1.offset }) {
            out.append((f.offset, "data at guest offset \(f.offset) (\(f.length) bytes) that was not recorded"))
        }
        return out
    }
}
