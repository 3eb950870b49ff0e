import ArgumentParser
import QCow2

/// `qimg backup --repo`: parses the repository options, runs the library's repository
/// backup, prints the point (JSON) or nothing on stdout, and one summary line.
struct RepoBackup {
    let command: Backup
    let repo: String

    func run() throws {
        let c = command
        let image = c.source
        if c.target != nil { throw CommandFailure(message: "\(image): with --repo no TARGET is given (the repository names its files)") }
        if c.sync != nil { throw CommandFailure(message: "\(image): with --repo qimg chooses full or incremental itself: --sync is not given") }
        guard let bitmap = c.bitmap, !bitmap.isEmpty else { throw CommandFailure(message: "\(image): --repo needs --bitmap=NAME (the job's bitmap)") }
        for (flag, given) in [("-b", c.backing != nil), ("-F", c.backingFormat != nil), ("--bitmap-mode", c.bitmapMode != nil),
                              ("--force", c.force), ("--no-backing", c.noBacking), ("-o", !c.options.isEmpty), ("-c", c.compress)] where given {
            throw CommandFailure(message: "\(image): \(flag) cannot be used with --repo")
        }
        var o = RepositoryBackupOptions(bitmap: bitmap)
        o.chain = c.chain
        if let t = c.time {
            guard let v = RepositoryTime.parse(t) else { throw CommandFailure(message: "\(image): invalid --time '\(t)' (ISO-8601, e.g. 2026-12-03T02:00:00Z)") }
            o.time = v
        }
        if let f = c.fullEvery { o.fullEvery = try Self.fullEvery(f, image: image) }
        let bar = ProgressReporter(enabled: c.showProgress && !c.quiet)
        o.progress = { bar.update($0, $1) }
        o.shouldStop = { Interruption.requested }
        Interruption.install()
        let log = RunLog(file: c.log)
        let r: RepositoryBackupResult
        do {
            r = try c.lockWait.apply { try RepositoryBackup.run(repository: repo, image: image, options: o) }
        } catch {
            bar.finish(succeeded: false)
            let failure = Interruption.requested ? Interruption.failure(image, "no point was added and the bitmap is unchanged") : RepoExit.failure(error, advice: Backup.advice)
            if c.log != nil, let f = failure as? CommandFailure { try? log.write("qimg: backup failed: " + f.message) }
            throw failure
        }
        bar.finish(succeeded: true)
        if c.output == .json { Output.out(Self.json(r).rendered() + "\n") }
        if !c.quiet || c.log != nil { try log.write(Self.summary(r, repo: repo)) }
    }

    /// The point a run made, as `--output=json` prints it (one object per disk).
    static func json(_ r: RepositoryBackupResult) -> JSON {
        var pairs: [(String, JSON)] = [("image", .string(r.chain))]
        if case .object(let p) = r.point.listJSON() { pairs += p }
        pairs.append(("full-reason", r.fullReason.map { .string(reason($0)) } ?? .null))
        return .object(pairs)
    }

    static func reason(_ r: FullReason) -> String { r == .policy ? "policy: --full-every" : r.rawValue }

    static func summary(_ r: RepositoryBackupResult, repo: String) -> String {
        let p = r.point
        let kind = p.kind == .full ? "full (\(r.fullReason.map(reason) ?? "requested"))" : "incremental on \(p.parent ?? "?")"
        let cleaned = r.cleaned.isEmpty ? "" : "; removed what killed runs left: \(r.cleaned.joined(separator: ", "))"
        return "qimg: backup \(repo): \(r.chain) point \(p.id) at \(RepositoryTime.iso(p.time)): \(kind), \(Human.size(p.bytesCopied)) copied in \(Human.format("%.2f", r.backup.seconds)) s\(cleaned)"
    }

    /// N (points) or Nd (days).
    static func fullEvery(_ s: String, image: String) throws -> RepositoryBackupOptions.FullEvery {
        let days = s.hasSuffix("d")
        guard let n = UInt64(days ? String(s.dropLast()) : s), n > 0 else {
            throw CommandFailure(message: "\(image): invalid --full-every '\(s)' (N points or Nd days, N > 0)")
        }
        return days ? .days(n) : .points(n)
    }
}
