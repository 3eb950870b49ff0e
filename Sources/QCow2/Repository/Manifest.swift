/// The manifest of a backup repository (`REPO/qimg-repository.json`): the repository's
/// id, and per image (chain) its restore points, oldest first.
public struct RepositoryManifest: Equatable, Sendable {
    public static let fileName = "qimg-repository.json"
    public static let formatName = "qimg-repository"
    public static let version: UInt64 = 1

    /// Random, made with the repository: bitmaps of two repositories never mix.
    public var repositoryID: String
    /// The number of the next point (point ids are this number, zero-padded).
    public var nextPoint: UInt64 = 1
    public var images: [ImageChain] = []

    public init(repositoryID: String) { self.repositoryID = repositoryID }

    public struct ImageChain: Equatable, Sendable {
        public var name: String
        public var points: [Point] = []
        public init(name: String) { self.name = name }
    }

    public struct DataRun: Equatable, Sendable {
        public var offset: UInt64
        public var length: UInt64
        public var sha256: String
        public init(offset: UInt64, length: UInt64, sha256: String) {
            self.offset = offset
            self.length = length
            self.sha256 = sha256
        }
    }

    public struct Point: Equatable, Sendable {
        public enum Kind: String, Sendable { case full, incremental }
        /// pending: durable and recorded, the image's bitmap not switched to it yet.
        public enum State: String, Sendable { case pending, complete }
        public var id: String
        /// Relative to the repository directory.
        public var file: String
        public var kind: Kind
        public var parent: String?
        /// Seconds since the epoch (UTC).
        public var time: Int64
        public var virtualSize: UInt64
        public var bytesCopied: UInt64
        public var bitmap: String
        public var state: State
        public var fileSize: UInt64
        /// SHA-256 of the point's qcow2 metadata (header cluster, L1 and L2 tables).
        public var metadataSHA256: String
        public var runs: [DataRun]
        /// Set by a prune between recording a merge into this point and finishing it; the
        /// next prune or backup finishes it.
        public var merge: PruneMerge? = nil
    }

    public func chain(_ name: String) -> ImageChain? { images.first { $0.name == name } }

    /// The points of `name`'s chain that `id` depends on, oldest first (a full first).
    public func ancestry(of id: String, in name: String) -> [Point] {
        guard let c = chain(name) else { return [] }
        var out: [Point] = []
        var next: String? = id
        while let n = next, let p = c.points.first(where: { $0.id == n }), out.count <= c.points.count {
            out.insert(p, at: 0)
            next = p.parent
        }
        return out
    }
}

// MARK: - JSON

extension RepositoryManifest {
    public func json() -> JSON {
        .object([
            ("format", .string(Self.formatName)),
            ("version", .uint(Self.version)),
            ("repository-id", .string(repositoryID)),
            ("next-point", .uint(nextPoint)),
            ("images", .array(images.map { c in .object([("image", .string(c.name)), ("points", .array(c.points.map { $0.json() }))]) })),
        ])
    }

    public static func parse(_ bytes: [UInt8]) throws -> RepositoryManifest {
        let j = try JSON.parse(bytes, rules: .manifest)
        var m = RepositoryManifest(repositoryID: try j.repositoryFileID(format: formatName, version: version, what: "manifest"))
        m.nextPoint = try j.field("next-point").number()
        for c in try j.field("images").array() {
            var chain = ImageChain(name: try c.field("image").string())
            chain.points = try c.field("points").array().map { try Point(json: $0) }
            m.images.append(chain)
        }
        return m
    }
}

extension RepositoryManifest.Point {
    func json() -> JSON {
        .object([
            ("id", .string(id)), ("file", .string(file)), ("kind", .string(kind.rawValue)),
            ("parent", parent.map { .string($0) } ?? .null), ("time", .string(RepositoryTime.iso(time))),
            ("virtual-size", .uint(virtualSize)), ("bytes-copied", .uint(bytesCopied)),
            ("bitmap", .string(bitmap)), ("state", .string(state.rawValue)),
            ("file-size", .uint(fileSize)), ("metadata-sha256", .string(metadataSHA256)),
            ("runs", .array(runs.map { .array([.uint($0.offset), .uint($0.length), .string($0.sha256)]) })),
        ] + (merge.map { [("merge", $0.json())] } ?? []))
    }

    init(json j: JSON) throws {
        id = try j.field("id").string()
        file = try j.field("file").string()
        guard let k = Kind(rawValue: try j.field("kind").string()) else { throw FormatError("kind", "not full or incremental") }
        kind = k
        if case .null? = j["parent"] { parent = nil } else { parent = try j.field("parent").string() }
        guard let t = RepositoryTime.parse(try j.field("time").string()) else { throw FormatError("time", "not an ISO-8601 UTC time") }
        time = t
        virtualSize = try j.field("virtual-size").number()
        bytesCopied = try j.field("bytes-copied").number()
        bitmap = try j.field("bitmap").string()
        guard let s = State(rawValue: try j.field("state").string()) else { throw FormatError("state", "not pending or complete") }
        state = s
        fileSize = try j.field("file-size").number()
        metadataSHA256 = try j.field("metadata-sha256").string()
        runs = try j.field("runs").array().map { r in
            let a = try r.array()
            guard a.count == 3 else { throw FormatError("runs", "a run is [offset, length, sha256]") }
            return RepositoryManifest.DataRun(offset: try a[0].number(), length: try a[1].number(), sha256: try a[2].string())
        }
        if let m = j["merge"] { merge = try PruneMerge(json: m) }
        for f in [file] + (merge?.files ?? []) { try RepositoryManifest.checkInside(f) }
    }
}

extension RepositoryManifest {
    /// The files a manifest or a prune journal names are names inside the repository
    /// (CHAIN/FILE), never a way out of it.
    static func checkInside(_ f: String) throws {
        let parts = f.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, parts.allSatisfy({ !$0.isEmpty && $0 != "." && $0 != ".." }) else {
            throw FormatError("file", "'\(f)' is not CHAIN/FILE inside the repository")
        }
    }
}

extension JSON {
    /// The repository id of a repository file's JSON (the manifest, a prune journal), after
    /// its format name and version are checked.
    func repositoryFileID(format: String, version: UInt64, what: String) throws -> String {
        guard try field("format").string() == format else { throw FormatError("format", "not a qimg repository \(what)") }
        let v = try field("version").number()
        guard v == version else { throw FormatError("version", "unsupported \(what) version \(v)") }
        let id = try field("repository-id").string()
        guard RepositoryID.isValid(id) else { throw FormatError("repository-id", "not a hex id") }
        return id
    }

    func field(_ key: String) throws -> JSON {
        guard let v = self[key] else { throw FormatError(key, "missing") }
        return v
    }
    func string() throws -> String {
        guard case .string(let s) = self else { throw FormatError("JSON", "expected a string") }
        return s
    }
    func number() throws -> UInt64 {
        guard let n = uint64 else { throw FormatError("JSON", "expected a number") }
        return n
    }
    func array() throws -> [JSON] {
        guard case .array(let a) = self else { throw FormatError("JSON", "expected an array") }
        return a
    }
}
