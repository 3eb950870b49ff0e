import ArgumentParser
import QCow2

/// `qimg repo`: the restore points of a backup repository (made by `qimg backup --repo`).
struct Repo: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "repo",
        abstract: "List, verify and restore the points of a backup repository (qimg backup --repo).",
        discussion: RepoExit.help,
        subcommands: [RepoList.self, RepoVerify.self, RepoRestore.self, RepoPrune.self])
}

struct RepoList: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list", abstract: "List the restore points, oldest first, per image, and the files that are not restore points.", discussion: RepoExit.help)

    @Option(name: .customLong("output"), help: ArgumentHelp("human or json.", valueName: "fmt")) var output: OutputFormat = .human
    @OptionGroup var lockWait: LockWaitOption
    @Argument(help: "The repository directory.") var repo: String

    func run() throws {
        let listing: RepoListing
        do {
            listing = try lockWait.apply {
                let r = try Repository(repo, create: false, lock: .shared)
                return RepoListing(manifest: r.manifest, unlisted: r.unlistedFiles())
            }
        } catch { throw RepoExit.failure(error) }
        Output.out(output == .json ? listing.json().rendered() + "\n" : listing.human(repo: repo))
    }
}

struct RepoVerify: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check every point (or one point's chain): files present and linked, clean, every recorded SHA-256 matching; no orphaned file.",
        discussion: RepoExit.help)

    @Option(name: .customLong("image"), help: ArgumentHelp("Only this image's chain.", valueName: "name")) var image: String?
    @Option(name: .customLong("point"), help: ArgumentHelp("Only this point and the points it is made of.", valueName: "id")) var point: String?
    @OptionGroup var lockWait: LockWaitOption
    @Argument(help: "The repository directory.") var repo: String

    func run() throws {
        let r: RepositoryVerify.Report
        do { r = try lockWait.apply { try RepositoryVerify.run(repository: repo, chain: image, point: point) } } catch { throw RepoExit.failure(error) }
        for p in r.problems {
            Output.error("qimg: \(repo)/\(p.file): point \(p.point)\(p.offset.map { " at guest offset \($0)" } ?? ""): \(p.detail)")
        }
        for o in r.orphans { Output.error("qimg: \(repo)/\(o.file): \(RepoListing.orphanNote): \(o.detail)") }
        if !r.isClean {
            let found = (r.problems.isEmpty ? [] : ["\(Human.count(r.problems.count, "problem")) in \(Human.count(r.pointsChecked, "point"))"])
                + (r.orphans.isEmpty ? [] : ["\(Human.count(r.orphans.count, "orphaned file")) (not restore points)"])
            throw CommandFailure(message: "\(repo): verify failed: \(found.joined(separator: ", "))", exitCode: RepoExit.damaged)
        }
        Output.out("\(repo): \(Human.count(r.pointsChecked, "point")) verified, \(Human.size(r.bytesRead)) of data read; no problem found\n")
    }
}

struct RepoRestore: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore",
        abstract: "Write a point (the newest by default) as a standalone image (no backing file).",
        discussion: RepoExit.help)

    @Option(name: .customLong("image"), help: ArgumentHelp("The image's chain (needed when the repository holds several).", valueName: "name")) var image: String?
    @Option(name: .customLong("point"), help: ArgumentHelp("The point to restore.", valueName: "id")) var point: String?
    @Option(name: .customLong("at"), help: ArgumentHelp("The newest point recorded at or before this time (ISO-8601).", valueName: "time")) var at: String?
    @Option(name: .customShort("O"), help: ArgumentHelp("Output format: qcow2 (default) or raw.", valueName: "fmt")) var format: String = "qcow2"
    @Flag(name: .customShort("p"), help: "Show progress.") var showProgress = false
    @OptionGroup var lockWait: LockWaitOption
    @Argument(help: "The repository directory.") var repo: String
    @Argument(help: "The image to write (must not exist).") var out: String

    func run() throws {
        var o = RepositoryRestore.Options()
        o.chain = image
        o.point = point
        if point != nil && at != nil { throw CommandFailure(message: "\(repo): --point and --at cannot be used together") }
        if let at {
            guard let t = RepositoryTime.parse(at) else { throw CommandFailure(message: "\(repo): invalid --at '\(at)' (ISO-8601, e.g. 2026-12-03T02:00:00Z)") }
            o.at = t
        }
        guard let f = ImageFormat(rawValue: format) else { throw CommandFailure(message: "\(out): unknown output format '\(format)' (qcow2 or raw)") }
        o.format = f
        o.shouldStop = { Interruption.requested }
        Interruption.install()
        let bar = ProgressReporter(enabled: showProgress)
        let p: RepositoryManifest.Point
        do {
            p = try lockWait.apply { try RepositoryRestore.run(repository: repo, target: out, options: o) { bar.update($0, $1) } }
        } catch {
            bar.finish(succeeded: false)
            if Interruption.requested { throw Interruption.failure(out, "\(out) was not written") }
            throw RepoExit.failure(error)
        }
        bar.finish(succeeded: true)
        Output.error("qimg: restore \(repo): point \(p.id) (\(RepositoryTime.iso(p.time))) written to \(out)")
    }
}

struct RepoPrune: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "prune",
        abstract: "Keep the points a policy names (--keep N newest, --keep-daily/weekly/monthly N); the others are merged into the kept points after them.",
        discussion: "Every kept point restores what it restored before, under the same id. A kept point whose parent expires is merged down (its data committed into the expired full, which becomes its file) or up (what it lacks copied into its own file), whichever copies less. A run killed at any moment is finished by the next prune or backup. " + RepoExit.help)

    @Option(name: .customLong("image"), help: ArgumentHelp("The image's chain (needed when the repository holds several).", valueName: "name")) var image: String?
    @Option(name: .customLong("keep"), help: ArgumentHelp("Keep the newest N points.", valueName: "N")) var keep: Int = 0
    @Option(name: .customLong("keep-daily"), help: ArgumentHelp("Keep the newest point of each of the newest N days (UTC) that have points.", valueName: "N")) var keepDaily: Int = 0
    @Option(name: .customLong("keep-weekly"), help: ArgumentHelp("Likewise for weeks (Monday to Sunday).", valueName: "N")) var keepWeekly: Int = 0
    @Option(name: .customLong("keep-monthly"), help: ArgumentHelp("Likewise for months.", valueName: "N")) var keepMonthly: Int = 0
    @Option(name: .customLong("output"), help: ArgumentHelp("human or json (the merges on stdout).", valueName: "fmt")) var output: OutputFormat = .human
    @OptionGroup var lockWait: LockWaitOption
    @Argument(help: "The repository directory.") var repo: String

    func run() throws {
        let r: RepositoryPrune.Result
        let policy = RetentionPolicy(last: keep, daily: keepDaily, weekly: keepWeekly, monthly: keepMonthly)
        if policy.isEmpty { throw CommandFailure(message: "\(repo): prune needs --keep, --keep-daily, --keep-weekly or --keep-monthly") }
        do { r = try lockWait.apply { try RepositoryPrune.run(repository: repo, chain: image, policy: policy) } } catch { throw RepoExit.failure(error) }
        if output == .json { Output.out(r.json().rendered() + "\n") }
        if r.removed.isEmpty {
            Output.error("qimg: prune \(repo): \(r.chain): nothing to prune")
        } else {
            Output.error("qimg: prune \(repo): \(r.chain): \(Human.plural(r.removed.count, "point")) \(r.removed.joined(separator: ", ")) merged into the kept \(r.removed.count == 1 ? "point after it" : "points after them")" + (r.into.map { " (from \($0) on)" } ?? "") + r.merges.map { m in
                ", \(m.point) \(m.direction == .up ? "merged up" : m.parent == nil ? "committed down into the full" : "committed down onto \(m.parent ?? "")")"
            }.joined() + ", \(Human.size(r.bytesCopied)) copied")
        }
    }
}

extension RepositoryPrune.Result {
    /// `{"image": NAME, "removed": [ID], "merges": [{"point", "direction", "parent",
    /// "bytes-copied", "bytes-other-way"}], "bytes-copied": N}`.
    func json() -> JSON {
        let merges: [JSON] = merges.map { m in
            .object([("point", .string(m.point)), ("direction", .string(m.direction.rawValue)), ("parent", m.parent.map { .string($0) } ?? .null),
                     ("bytes-copied", .uint(m.bytesCopied)), ("bytes-other-way", m.otherWay.map { .uint($0) } ?? .null)])
        }
        return .object([("image", .string(chain)), ("removed", .array(removed.map { .string($0) })), ("merges", .array(merges)),
                        ("bytes-copied", .uint(bytesCopied))])
    }
}
