import ArgumentParser
import QCow2

/// `qimg backup --qmp SOCKET --node NODE ... TARGET`: a push backup of a running VM's disk
/// (QEMU copies it into TARGET), through the library's `PushBackup`.
struct LiveBackup {
    let command: Backup
    let socket: String

    func run() throws {
        let c = command
        let nodes = c.live.nodes
        guard !nodes.isEmpty else { throw CommandFailure(message: "\(socket): --qmp needs --node NODE (the disk to back up)") }
        if let repo = c.repo { return try runRepository(repo, nodes: nodes) }
        guard nodes.count == 1 else { throw CommandFailure(message: "\(socket): several --node need --repo DIR") }
        // With --qmp the one positional argument is TARGET (the source is QEMU's node).
        guard c.target == nil, !c.source.isEmpty else { throw CommandFailure(message: "\(socket): --qmp takes exactly one TARGET (the disk is --node)") }
        let target = c.source
        for (flag, given) in [("-f", c.sourceFormat != nil), ("-c", c.compress), ("--speed", c.speed != nil), ("--name", !c.chains.isEmpty),
                              ("--time", c.time != nil), ("--full-every", c.fullEvery != nil), ("--log", c.log != nil), ("--lock-wait", c.lockWait.seconds != nil),
                              ("--output", c.output != .human)] where given {
            throw CommandFailure(message: "\(socket): \(flag) cannot be used with --qmp")
        }
        var o = PushOptions()
        var disk = LiveDisk(node: nodes[0], target: target, backingFile: c.backing,
                            backingFormat: try c.backingFormat.map { try ImageFormat(name: $0, path: c.backing ?? "") })
        let sync = c.sync ?? "full"
        guard let s = BackupOptions.Sync(rawValue: sync == "dirty-bitmap" ? "incremental" : sync) else {
            throw CommandFailure(message: "\(socket): invalid sync mode '\(sync)' (full, incremental, bitmap)")
        }
        disk.sync = s
        disk.bitmap = c.bitmap
        if let m = c.bitmapMode {
            guard let mode = BackupOptions.BitmapMode(rawValue: m) else {
                throw CommandFailure(message: "\(socket): invalid bitmap mode '\(m)' (on-success, never)")
            }
            disk.bitmapMode = mode
        }
        if s != .full, c.backing == nil, !c.noBacking {
            throw CommandFailure(message: "\(socket): sync=\(sync) needs -b PREV (the previous backup, whose contents the new one builds on); --no-backing makes a delta that reads as zeros wherever nothing changed")
        }
        o.create = try c.targetCreateOptions(target)
        o.force = c.force
        o.shouldStop = { Interruption.requested }
        o.freeze = c.live.guestFreeze
        o.qmpTimeout = try c.live.timeoutSeconds(socket)
        Interruption.install()
        let r: PushResult
        do {
            r = try PushBackup.run(socket: socket, disks: [disk], options: o)
        } catch let e as QCow2Error {
            throw failure(e, kept: "\(target) was not written and the bitmap keeps its bits")
        }
        if !c.quiet {
            Output.out("Backup complete: \(target): \(r.bytesCopied[0]) bytes copied by QEMU from node '\(nodes[0])' in \(Human.format("%.2f", r.seconds)) s\(FreezeNote.text(o.freeze))\n")
        }
    }

    /// Several disks (or one) into a repository: one point per disk, all or none.
    func runRepository(_ repo: String, nodes: [String]) throws {
        let c = command
        guard let bitmap = c.bitmap, !bitmap.isEmpty else { throw CommandFailure(message: "\(socket): --repo needs --bitmap=NAME (the job's bitmap)") }
        guard c.source.isEmpty, c.target == nil else { throw CommandFailure(message: "\(socket): with --qmp and --repo no file is given (the repository names its files)") }
        for (flag, given) in [("--sync", c.sync != nil), ("-b", c.backing != nil), ("-F", c.backingFormat != nil), ("--bitmap-mode", c.bitmapMode != nil),
                              ("--force", c.force), ("--no-backing", c.noBacking), ("-o", !c.options.isEmpty), ("-c", c.compress), ("-f", c.sourceFormat != nil),
                              ("--speed", c.speed != nil)] where given {
            throw CommandFailure(message: "\(socket): \(flag) cannot be used with --qmp and --repo")
        }
        var o = RepositoryBackupOptions(bitmap: bitmap)
        if let t = c.time {
            guard let v = RepositoryTime.parse(t) else { throw CommandFailure(message: "\(socket): invalid --time '\(t)' (ISO-8601, e.g. 2026-12-03T02:00:00Z)") }
            o.time = v
        }
        if let f = c.fullEvery { o.fullEvery = try RepoBackup.fullEvery(f, image: socket) }
        o.shouldStop = { Interruption.requested }
        Interruption.install()
        let log = RunLog(file: c.log)
        let results: [RepositoryBackupResult]
        let freeze = c.live.guestFreeze
        let qmpTimeout = try c.live.timeoutSeconds(socket)
        do {
            results = try c.lockWait.apply {
                try LiveRepositoryBackup.run(socket: socket, repository: repo, nodes: nodes, chains: c.chains.isEmpty ? nil : c.chains, options: o, freeze: freeze,
                                             qmpTimeout: qmpTimeout)
            }
        } catch let e as QCow2Error {
            throw failure(e, kept: "no point was added for any disk and every bitmap keeps its bits")
        }
        // An array, in --node order, of the object an offline `--repo --output=json` run prints.
        if c.output == .json { Output.out(JSON.array(results.map(RepoBackup.json)).rendered() + "\n") }
        for r in results where !c.quiet || c.log != nil { try log.write(RepoBackup.summary(r, repo: repo) + FreezeNote.text(freeze)) }
    }

    /// The line and exit code of a failed live run.
    func failure(_ e: QCow2Error, kept: String) -> CommandFailure {
        if case .live(_, .cancelled, _) = e, Interruption.requested { return Interruption.failure(socket, kept) }
        return CommandFailure(message: ErrorText.line(e, advice: Backup.advice), exitCode: LiveExit.code(for: e))
    }
}

