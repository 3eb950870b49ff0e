import Foundation
import Testing
import TestSupport
@testable import QCow2

/// A repository backup hashes its data runs while its copy writes them (`CopiedRunHasher`,
/// a `CopyObserver` of the copy engine) instead of reading the point again. Over many
/// shapes of full and incremental backups, the runs hashed during the copy must be exactly
/// the ones `PointDigest.compute` reads back from the finished point, and those must be
/// what QEMU sees in that file: its own data extents (`qemu-img map`, depth 0) cut at every
/// 4 MiB, each the SHA-256 of the guest bytes `qemu-img convert` reads there.
@Suite struct CopiedRunDigestTests {
    struct Shape: CustomTestStringConvertible, Sendable {
        var name: String
        var size = "20M"
        var sourceCluster = 65536
        var granularity = 65536
        var targetCluster = 65536
        var extendedL2 = false
        var compressed = false
        /// qemu-io commands before the full backup, and between it and the incremental.
        var writes: [String]
        var changes: [String]
        /// Whether the copy's runs are the file's (false: the subclusters of an extended L2
        /// target are filled around data written in smaller pieces, and the file is read).
        var fromCopy = true
        var testDescription: String { name }
    }

    /// Data crossing 4 MiB boundaries, zero data and zero clusters inside data, a partial
    /// cluster at an unaligned end of a write.
    static let writes = ["write -P 1 0 64k", "write -P 2 1M 300k", "write -P 3 3M 2M", "write -P 0 3584k 128k",
                         "write -z 4352k 64k", "write -P 4 12M 7M", "write -P 9 19M 512"]
    static let changes = ["write -P 5 3M 64k", "write -P 0 3200k 64k", "write -z 12M 1M", "write -P 6 18M 1536k",
                          "write -P 7 8M 4k", "write -P 8 8200k 4k"]
    static let scattered = (0..<48).map { "write -P \(1 + $0 % 200) \($0 * 300)k 4k" }

    static let shapes: [Shape] = [
        Shape(name: "64 KiB clusters", writes: writes, changes: changes),
        Shape(name: "4 KiB clusters, 64 KiB granularity", sourceCluster: 4096, granularity: 65536, targetCluster: 4096,
              writes: writes + scattered, changes: changes + scattered.map { $0.replacingOccurrences(of: " 4k", with: " 512") }),
        Shape(name: "2 MiB clusters, 64 KiB granularity", sourceCluster: 2 << 20, targetCluster: 2 << 20, writes: writes, changes: changes),
        Shape(name: "64 KiB target of a 4 KiB source, 4 KiB granularity", sourceCluster: 4096, granularity: 4096,
              writes: scattered, changes: changes),
        Shape(name: "unaligned disk size", size: "20975104", writes: writes + ["write -P 3 20970496 4608"],
              changes: changes + ["write -P 4 20971008 4096"]),
        Shape(name: "compressed", compressed: true, writes: writes, changes: changes),
        Shape(name: "compressed 4 KiB clusters", targetCluster: 4096, compressed: true, writes: writes + scattered, changes: changes),
        Shape(name: "extended L2, 64 KiB clusters", extendedL2: true, writes: writes, changes: changes),
        Shape(name: "extended L2, 2 MiB clusters", targetCluster: 2 << 20, extendedL2: true, writes: writes, changes: changes, fromCopy: false),
    ]

    @Test(.requiresQEMU, arguments: shapes) func copiedRunsAreTheFilesRuns(_ s: Shape) throws {
        let dir = try Paths.newScratch("copied-runs")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=\(s.sourceCluster)", "src.qcow2", s.size], in: dir)
        try Runner.qemuStep(["qemu-img", "bitmap", "--add", "-g", "\(s.granularity)", "src.qcow2", "b"], in: dir)
        try Runner.qemuStep(["qemu-io"] + s.writes.flatMap { ["-c", $0] } + ["src.qcow2"], in: dir)
        try Self.backup(s, dir, sync: .full, target: "full.qcow2")
        try Runner.qemuStep(["qemu-io"] + s.changes.flatMap { ["-c", $0] } + ["src.qcow2"], in: dir)
        try Self.backup(s, dir, sync: .incremental, target: "inc.qcow2")
    }

    /// `qimg backup --repo`'s library call records the runs hashed during the copy (full,
    /// then incremental), and they are what reading the point gives.
    @Test(.requiresQEMU) func repositoryBackupHashesWhileCopying() throws {
        let dir = try Paths.newScratch("copied-runs-repo")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Runner.qemuStep(["qemu-img", "create", "-q", "-f", "qcow2", "vm.qcow2", "20M"], in: dir)
        for (day, commands) in [Self.writes, Self.changes].enumerated() {
            try Runner.qemuStep(["qemu-io"] + commands.flatMap { ["-c", $0] } + ["vm.qcow2"], in: dir)
            var o = RepositoryBackupOptions(bitmap: "daily")
            o.time = 1_767_225_600 + Int64(day) * 86400
            let r = try RepositoryBackup.run(repository: dir + "/R", image: dir + "/vm.qcow2", options: o)
            #expect(r.point.kind == (day == 0 ? RepositoryManifest.Point.Kind.full : .incremental))
            #expect(r.digestsFromCopy, "day \(day)")
            let read = try PointDigest.compute(dir + "/R/" + r.point.file)
            #expect(r.point.runs == read.runs && r.point.metadataSHA256 == read.metadataSHA256 && r.point.fileSize == read.fileSize)
            #expect(r.point.runs.count > 2)
        }
        let v = try RepositoryVerify.run(repository: dir + "/R", chain: nil, point: nil)
        #expect(v.problems.isEmpty && v.pointsChecked == 2, "\(v.problems)")
    }

    /// A backup with a `CopiedRunHasher` watching its copy; its runs checked as above.
    static func backup(_ s: Shape, _ dir: String, sync: BackupOptions.Sync, target: String) throws {
        let label = "\(s.name), \(sync)"
        var o = BackupOptions()
        o.sync = sync
        o.bitmap = "b"
        o.create.clusterSize = s.targetCluster
        o.create.extendedL2 = s.extendedL2
        o.compressed = s.compressed
        if sync == .incremental {
            o.backingFile = "full.qcow2"
            o.backingFormat = .qcow2
        }
        let hasher = try CopiedRunHasher()
        o.observer = hasher
        _ = try BackupOperation.run(source: dir + "/src.qcow2", target: dir + "/" + target, options: o)
        let copied = try hasher.finish()
        let read = try PointDigest.compute(dir + "/" + target)
        if s.fromCopy {
            #expect(copied == read.runs, "\(label): the runs hashed during the copy")
        } else {
            #expect(copied != read.runs, "\(label): the copy's pieces are not the file's runs")
        }
        let combined = try PointDigest.compute(dir + "/" + target, copied: copied)
        #expect(combined.digest == read, "\(label)")
        #expect(combined.fromCopy == s.fromCopy, "\(label)")
        // QEMU's view of the same file.
        let qemu = try qemuRuns(target, dir)
        #expect(read.runs.map { [$0.offset, $0.length] } == qemu.map { [$0.0, $0.1] }, "\(label): runs vs qemu-img map")
        try Runner.qemuStep(["qemu-img", "convert", "-O", "raw", target, "guest.raw"], in: dir)
        let raw = try Data(contentsOf: URL(fileURLWithPath: dir + "/guest.raw"))
        for r in read.runs where r.offset + r.length <= UInt64(raw.count) {
            let sum = try raw[Int(r.offset)..<Int(r.offset + r.length)].withUnsafeBytes { b in
                var h = try SHA256()
                h.update(b)
                return h.finish()
            }
            #expect(sum == r.sha256, "\(label): the run at \(r.offset)")
        }
        #expect(read.runs.count > 2, "\(label): \(read.runs.count) runs")
        try expectCheckClean(target, dir, label)
    }

    /// The file's own data extents as qemu-img map reports them (depth 0, data), merged and
    /// cut at every 4 MiB of the guest.
    static func qemuRuns(_ file: String, _ dir: String) throws -> [(UInt64, UInt64)] {
        let r = try Runner.qemuStep(["qemu-img", "map", "--output=json", file], in: dir)
        let entries = try JSONSerialization.jsonObject(with: r.stdout) as? [[String: Any]] ?? []
        var ranges: [(UInt64, UInt64)] = []
        for e in entries where (e["depth"] as? Int) == 0 && (e["data"] as? Bool) == true {
            let start = (e["start"] as? NSNumber)?.uint64Value ?? 0, length = (e["length"] as? NSNumber)?.uint64Value ?? 0
            if let last = ranges.last, last.0 + last.1 == start { ranges[ranges.count - 1].1 += length } else { ranges.append((start, length)) }
        }
        let cut: UInt64 = 4 << 20
        return ranges.flatMap { Self.cuts($0.0, $0.1, cut) }
    }

    /// [a, a+n) split at every multiple of `cut` inside it.
    static func cuts(_ a: UInt64, _ n: UInt64, _ cut: UInt64) -> [(UInt64, UInt64)] {
        var bounds: [UInt64] = [a]
        var next: UInt64 = (a / cut + 1) * cut
        while next < a + n {
            bounds.append(next)
            next += cut
        }
        bounds.append(a + n)
        return zip(bounds, bounds.dropFirst()).map { ($0, $1 - $0) }
    }
}
