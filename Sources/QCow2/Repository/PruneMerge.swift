#if canImport(Glibc)
import Glibc
#endif

/// A merge a prune recorded on a kept point (manifest `merge`) before changing any file:
/// what the point's file becomes, and the expired files its old chain still reads. Every
/// step is idempotent, so the next prune or backup repeats an unfinished one.
///
/// - `down`: the kept point's data and the expired incrementals' data below it are
///   committed into the oldest expired point (`files[0]`: a full, or an incremental on
///   `parent`) in place (its file then reads as the kept point; the kept point's file,
///   still backed through it, reads the same), then that file is renamed over the kept
///   point's file: the kept id, backed by `parent`'s file or a full.
/// - `up`: the kept point's file is rebased in place onto `parent`'s file (nil: no backing
///   file): only what the kept point lacks and the expired points hold is copied into it
///   (`PruneUpMerge`).
public struct PruneMerge: Equatable, Sendable {
    public enum Direction: String, Sendable { case down, up }

    public var direction: Direction
    /// The point's parent once merged (nil: a full).
    public var parent: String?
    /// Relative to the repository: the expired files the point's old chain reads (down:
    /// the oldest first).
    public var files: [String]

    public init(direction: Direction, parent: String?, files: [String]) {
        self.direction = direction
        self.parent = parent
        self.files = files
    }

    /// Changes `p.file` as recorded (`parentFile`: the new parent's file, relative) and
    /// returns what the file then holds.
    func perform(on p: RepositoryManifest.Point, parentFile: String?, repo: Repository) throws -> PointDigest {
        let path = repo.file(p.file)
        switch direction {
        case .down:
            guard let bottomFile = files.first else { throw damaged(path, p, "records a downward merge without the point it commits into") }
            let full = repo.file(bottomFile)
            var st = stat()
            // Missing: renamed over the point's file already by a run killed after it.
            if Sys.lstat(full, &st) == 0 {
                var o = CommitOptions()
                o.format = .qcow2
                o.base = full
                try CommitOperation.run(path, options: o)
                try Self.repairLeaks(full)
                guard Sys.rename(full, path) == 0 else { throw QCow2Error.io(path: full, operation: "rename", errno: errno) }
                try StagedFile.syncDirectory(of: path)
            }
        case .up:
            // Rebased already by a killed run (whose last step may have removed the expired
            // files since: a manifest rebuilt from its journal records the merge again).
            if try PointDigest.openAlone(path).backingFileName != parentFile.map(Self.bareName) {
                try PruneUpMerge.run(path, expired: files.reversed().map(repo.file), parentName: parentFile.map(Self.bareName))
            }
            try Self.repairLeaks(path)
        }
        let backing = try PointDigest.openAlone(path).backingFileName
        guard backing == parentFile.map(Self.bareName) else {
            throw damaged(path, p, "is backed by '\(backing ?? "nothing")' after the prune's merge, not by \(parentFile.map { "'\(Self.bareName($0))'" } ?? "nothing")")
        }
        return try PointDigest.compute(path)
    }

    static func bareName(_ relative: String) -> String { String(relative.split(separator: "/").last ?? "") }

    func damaged(_ path: String, _ p: RepositoryManifest.Point, _ what: String) -> QCow2Error {
        .repositoryDamaged(path: path, field: "merge", detail: "restore point \(p.id) \(what)")
    }

    /// A merge killed half-way may leave clusters allocated and never referenced: freed,
    /// so that every file checks clean.
    static func repairLeaks(_ path: String) throws {
        var opener = ImageOpener()
        opener.writable = true
        opener.openBacking = false
        guard let q = try opener.open(path, format: .qcow2) as? QCow2Image else { return }
        let r = try CheckOperation.repair(q, mode: .leaks, report: { _ in })
        try q.close()
        guard r.corruptions == 0 && r.checkErrors == 0 else {
            throw QCow2Error.repositoryDamaged(path: path, field: "", detail: "qemu-img check finds \(r.corruptions) corruptions in the file being merged")
        }
    }
}

// MARK: - JSON

extension PruneMerge {
    func json() -> JSON {
        .object([("direction", .string(direction.rawValue)), ("parent", parent.map { .string($0) } ?? .null),
                 ("files", .array(files.map { .string($0) }))])
    }

    init(json j: JSON) throws {
        guard let d = Direction(rawValue: try j.field("direction").string()) else { throw FormatError("merge", "direction is not down or up") }
        direction = d
        if case .null? = j["parent"] { parent = nil } else { parent = try j.field("parent").string() }
        files = try j.field("files").array().map { try $0.string() }
        guard direction == .up || !files.isEmpty else { throw FormatError("merge", "a downward merge names the point it commits into") }
    }
}
