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
        if c.repo != nil { throw CommandFailure(message: "\(socket): --qmp with --repo is not available yet") }
        guard nodes.count == 1 else { throw CommandFailure(message: "\(socket): several --node need --repo DIR") }
        // With --qmp the one positional argument is TARGET (the source is QEMU's node).
        guard c.target == nil, !c.source.isEmpty else { throw CommandFailure(message: "\(socket): --qmp takes exactly one TARGET (the disk is --node)") }
        let target = c.source
        for (flag, given) in [("-f", c.sourceFormat != nil), ("-c", c.compress), ("--speed", c.speed != nil), ("--name", c.chain != nil),
                              ("--time", c.time != nil), ("--full-every", c.fullEvery != nil), ("--log", c.log != nil)] where given {
            throw CommandFailure(message: "\(socket): \(flag) cannot be used with --qmp")
        }
        var o = PushOptions()
        let sync = c.sync ?? "full"
        guard let s = BackupOptions.Sync(rawValue: sync == "dirty-bitmap" ? "incremental" : sync) else {
            throw CommandFailure(message: "\(socket): invalid sync mode '\(sync)' (full, incremental, bitmap)")
        }
        o.sync = s
        o.bitmap = c.bitmap
        if let m = c.bitmapMode {
            guard let mode = BackupOptions.BitmapMode(rawValue: m) else {
                throw CommandFailure(message: "\(socket): invalid bitmap mode '\(m)' (on-success, never)")
            }
            o.bitmapMode = mode
        }
        if s != .full, c.backing == nil, !c.noBacking {
            throw CommandFailure(message: "\(socket): sync=\(sync) needs -b PREV (the previous backup, whose contents the new one builds on); --no-backing makes a delta that reads as zeros wherever nothing changed")
        }
        o.create = try c.targetCreateOptions(target)
        o.force = c.force
        o.shouldStop = { Interruption.requested }
        Interruption.install()
        let disk = LiveDisk(node: nodes[0], target: target, backingFile: c.backing,
                            backingFormat: try c.backingFormat.map { try ImageFormat(name: $0, path: c.backing ?? "") })
        let r: PushResult
        do {
            r = try PushBackup.run(socket: socket, disks: [disk], options: o)
        } catch let e as QCow2Error {
            if case .live(_, .cancelled, _) = e, Interruption.requested {
                throw Interruption.failure(socket, "\(target) was not written and the bitmap keeps its bits")
            }
            let code: Int32
            if case .live(_, let p, _) = e { code = LiveExit.code(p) } else { code = RepoExit.code(e) == RepoExit.ioError ? RepoExit.ioError : 1 }
            throw CommandFailure(message: ErrorText.line(e, advice: Backup.advice), exitCode: code)
        }
        if !c.quiet {
            Output.out("Backup complete: \(target): \(r.bytesCopied[0]) bytes copied by QEMU from node '\(nodes[0])' in \(Human.format("%.2f", r.seconds)) s\n")
        }
    }
}
