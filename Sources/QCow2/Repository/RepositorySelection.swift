/// Choosing a chain and a point of a repository (restore, verify).
extension RepositoryManifest {
    /// Chain `name`, or the only chain when `name` is nil.
    public func selectChain(_ name: String?, path: String) throws -> ImageChain {
        if let name {
            guard let c = chain(name) else {
                throw QCow2Error.invalidArgument(path: path, detail: "the repository has no chain '\(name)' (it has: \(images.map(\.name).joined(separator: ", ")))")
            }
            return c
        }
        guard images.count == 1 else {
            throw QCow2Error.invalidArgument(path: path, detail: images.isEmpty ? "the repository holds no restore point"
                : "the repository holds \(images.count) chains (\(images.map(\.name).joined(separator: ", "))): name one")
        }
        return images[0]
    }

    /// Point `id`, else the newest complete point recorded at or before `at`, else the
    /// newest complete point.
    public func selectPoint(in c: ImageChain, id: String?, at: Int64?, path: String) throws -> Point {
        let complete = c.points.filter { $0.state == .complete }
        if let id {
            guard let p = complete.first(where: { $0.id == id }) else {
                throw QCow2Error.invalidArgument(path: path, detail: "chain '\(c.name)' has no restore point '\(id)'")
            }
            return p
        }
        if let at {
            guard let p = complete.last(where: { $0.time <= at }) else {
                throw QCow2Error.invalidArgument(path: path, detail: "chain '\(c.name)' has no restore point at or before \(RepositoryTime.iso(at))")
            }
            return p
        }
        guard let p = complete.last else { throw QCow2Error.invalidArgument(path: path, detail: "chain '\(c.name)' has no restore point") }
        return p
    }
}

extension RepositoryManifest.Point {
    /// The keys `repo list --output=json` and `backup --repo --output=json` print.
    public func listJSON() -> JSON {
        .object([
            ("id", .string(id)), ("file", .string(file)), ("kind", .string(kind.rawValue)),
            ("parent", parent.map { .string($0) } ?? .null), ("time", .string(RepositoryTime.iso(time))),
            ("virtual-size", .uint(virtualSize)), ("bytes-copied", .uint(bytesCopied)),
            ("state", .string(state.rawValue)), ("file-size", .uint(fileSize)), ("bitmap", .string(bitmap)),
        ])
    }
}
