#if canImport(Glibc)
import Glibc
#endif

/// `qimg repo restore`: a standalone image (no backing file) with a point's contents.
public enum RepositoryRestore {
    public struct Options: Sendable {
        public var chain: String?
        public var point: String?
        public var at: Int64?
        public var format: ImageFormat = .qcow2
        public var shouldStop: @Sendable () -> Bool = { false }
        public init() {}
    }

    /// Returns the point restored.
    public static func run(repository repoPath: String, target: String, options o: Options,
                           progress: ((UInt64, UInt64) -> Void)? = nil) throws -> RepositoryManifest.Point {
        let repo = try Repository(repoPath, create: false, lock: .shared)
        let chain = try repo.manifest.selectChain(o.chain, path: repoPath)
        let point = try repo.manifest.selectPoint(in: chain, id: o.point, at: o.at, path: repoPath)
        var st = stat()
        if Sys.lstat(target, &st) == 0 { throw QCow2Error.targetExists(path: target) }
        // Every file of the point's chain, before anything is written: a missing one is damage
        // (exit 2 in the CLI), named by its point, not a backing file that fails to open.
        var ancestor = chain.points.first { $0.id == point.parent }
        var seen: Set<String> = [point.id]
        while let a = ancestor, seen.insert(a.id).inserted {
            let f = repo.file(a.file)
            guard Sys.stat(f, &st) == 0 else {
                throw QCow2Error.repositoryDamaged(path: f, field: "", detail: "restore point \(point.id) is built on point \(a.id), whose file is missing")
            }
            ancestor = chain.points.first { $0.id == a.parent }
        }
        let file = repo.file(point.file)
        guard Sys.stat(file, &st) == 0 else {
            throw QCow2Error.repositoryDamaged(path: file, field: "", detail: "the file of restore point \(point.id) is missing")
        }
        let source = try ImageOpener().open(file, format: .qcow2)
        var c = ConvertOptions()
        c.create.format = o.format
        c.create.size = source.virtualSize
        c.shouldStop = o.shouldStop
        // Never readable by more users than the backup itself.
        try StagedFile.$creationMode.withValue(st.st_mode & 0o666) {
            try ConvertOperation.run(source: source, target: target, options: c, progress: progress)
        }
        return point
    }
}
