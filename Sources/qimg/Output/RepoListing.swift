import QCow2

/// `qimg repo list`: per image (the manifest's chains, then directories that hold only
/// unlisted files) its restore points, its orphaned files (kept, damage for verify) and
/// the leftovers of killed runs (removed by the next backup or prune).
struct RepoListing {
    var manifest: RepositoryManifest
    var unlisted: [UnlistedFile]

    /// How verify and list call an orphan.
    static let orphanNote = "not a restore point (kept)"

    struct Image {
        var name: String
        var points: [RepositoryManifest.Point]
        var orphans: [UnlistedFile]
        var leftovers: [UnlistedFile]
    }

    /// Orphans beside the manifest, in no chain directory.
    var outside: [UnlistedFile] { unlisted.filter { $0.chain.isEmpty } }

    var images: [Image] {
        let known = manifest.images.map(\.name)
        let others = unlisted.map(\.chain).filter { !$0.isEmpty && !known.contains($0) }
        let names = known + others.enumerated().filter { others.firstIndex(of: $0.element) == $0.offset }.map(\.element)
        return names.map { n in
            let u = unlisted.filter { $0.chain == n }
            return Image(name: n, points: manifest.chain(n)?.points ?? [], orphans: u.filter { !$0.isLeftover }, leftovers: u.filter(\.isLeftover))
        }
    }

    /// `{"images": [{"image", "points": [...], "orphans": [{"file", "reason"}], "leftovers": [...]}],
    /// "orphans": [...]}` (the last: files beside the manifest).
    func json() -> JSON {
        let files = { (u: [UnlistedFile]) in JSON.array(u.map { .object([("file", .string($0.file)), ("reason", .string($0.detail))]) }) }
        return .object([("images", .array(images.map { i in
            .object([("image", .string(i.name)), ("points", .array(i.points.map { $0.listJSON() })),
                     ("orphans", files(i.orphans)), ("leftovers", files(i.leftovers))])
        })), ("orphans", files(outside))])
    }

    func human(repo: String) -> String {
        var out = "Repository \(repo) (id \(manifest.repositoryID))\n"
        for i in images {
            out += "\n\(i.name): \(Human.count(i.points.count, "point"))\n"
            if !i.points.isEmpty {
                out += "ID      TIME                  KIND         PARENT  VIRTUAL SIZE  COPIED      STATE     FILE\n"
                for p in i.points {
                    out += [pad(p.id, 7), pad(RepositoryTime.iso(p.time), 21), pad(p.kind.rawValue, 12), pad(p.parent ?? "-", 7),
                            pad(Human.size(p.virtualSize), 13), pad(Human.size(p.bytesCopied), 11), pad(p.state.rawValue, 9), p.file].joined(separator: " ") + "\n"
                }
            }
            out += i.orphans.map(orphanLine).joined()
            for l in i.leftovers { out += "leftover \(l.file): \(l.detail)\n" }
        }
        if !outside.isEmpty { out += "\n" + outside.map(orphanLine).joined() }
        return out
    }

    func orphanLine(_ o: UnlistedFile) -> String { "orphan   \(o.file): \(Self.orphanNote): \(o.detail)\n" }

    func pad(_ s: String, _ n: Int) -> String { s + String(repeating: " ", count: max(0, n - s.count)) }
}
