/// What a restore point's file holds, as the manifest records it: the file's size, a
/// SHA-256 of its qcow2 metadata (header cluster, L1 table, L2 tables: which guest
/// clusters it holds and where), and a SHA-256 per data run (maximal runs of guest data
/// the file itself holds, cut at every `maxRun` boundary of the guest address space).
public struct PointDigest: Equatable, Sendable {
    public static let maxRun: UInt64 = 4 << 20

    public var fileSize: UInt64
    public var metadataSHA256: String
    public var runs: [RepositoryManifest.DataRun]

    /// Reads the point at `path` (its own layer only; the backing file is not opened).
    public static func compute(_ path: String) throws -> PointDigest {
        let q = try openAlone(path)
        return PointDigest(fileSize: try q.file.size(), metadataSHA256: try metadataDigest(q), runs: try dataRuns(q))
    }

    /// The digest of a point a copy has just written, with the runs' digests `copied`
    /// computed from the bytes that copy wrote (`CopiedRunHasher`): they are taken when
    /// they are exactly the runs the finished file holds (offsets and lengths, from its
    /// metadata), else the runs are read from the file and hashed (`fromCopy` false).
    static func compute(_ path: String, copied: [RepositoryManifest.DataRun]) throws -> (digest: PointDigest, fromCopy: Bool) {
        let q = try openAlone(path)
        let ranges = try dataRanges(q)
        let fromCopy = ranges.count == copied.count && zip(ranges, copied).allSatisfy { $0.0 == $1.offset && $0.1 == $1.length }
        let runs = fromCopy ? copied : try dataRuns(q, ranges)
        return (PointDigest(fileSize: try q.file.size(), metadataSHA256: try metadataDigest(q), runs: runs), fromCopy)
    }

    /// Only the size and the metadata digest (what a backup checks of the newest point).
    public static func identity(_ path: String) throws -> (fileSize: UInt64, metadataSHA256: String) {
        let q = try openAlone(path)
        return (try q.file.size(), try metadataDigest(q))
    }

    /// A point file read-only, without its backing file.
    static func openAlone(_ path: String) throws -> QCow2Image {
        var opener = ImageOpener()
        opener.openBacking = false
        guard let q = try opener.open(path, format: .qcow2) as? QCow2Image else {
            throw QCow2Error.invalidArgument(path: path, detail: "not a qcow2 image")
        }
        return q
    }

    static func metadataDigest(_ q: QCow2Image) throws -> String {
        let cluster = Int(q.geometry.clusterSize)
        var h = try SHA256()
        h.update(try q.file.read(count: cluster, at: 0))
        var l1: [UInt8] = []
        l1.reserveCapacity(q.l1Table.count * 8)
        for e in q.l1Table { for s in stride(from: 56, through: 0, by: -8) { l1.append(UInt8(truncatingIfNeeded: e >> UInt64(s))) } }
        h.update(l1)
        for e in q.l1Table {
            let l2 = L1Entry(e).l2Offset
            if l2 != 0 { h.update(try q.file.read(count: cluster, at: l2)) }
        }
        return h.finish()
    }

    /// The guest ranges holding data in `q`'s own layer, cut into runs.
    static func dataRanges(_ q: QCow2Image) throws -> [(UInt64, UInt64)] {
        var ranges: [(UInt64, UInt64)] = []
        var pos: UInt64 = 0
        while pos < q.virtualSize {
            let e = try q.layerExtent(at: pos, maxLength: q.virtualSize - pos)
            guard e.length > 0 else { break }
            switch e.descriptor {
            case .normal, .compressed:
                if let last = ranges.last, last.0 + last.1 == pos { ranges[ranges.count - 1].1 += e.length } else { ranges.append((pos, e.length)) }
            case .zero, .unallocated: break
            }
            pos += e.length
        }
        var runs: [(UInt64, UInt64)] = []
        for (a, n) in ranges {
            var p = a
            while p < a + n {
                let end = min(a + n, (p / maxRun + 1) * maxRun)
                runs.append((p, end - p))
                p = end
            }
        }
        return runs
    }

    static func dataRuns(_ q: QCow2Image) throws -> [RepositoryManifest.DataRun] {
        try dataRuns(q, try dataRanges(q))
    }

    static func dataRuns(_ q: QCow2Image, _ ranges: [(UInt64, UInt64)]) throws -> [RepositoryManifest.DataRun] {
        let sums = try RunHasher.digests(q, ranges: ranges)
        return zip(ranges, sums).map { RepositoryManifest.DataRun(offset: $0.0.0, length: $0.0.1, sha256: $0.1) }
    }
}
