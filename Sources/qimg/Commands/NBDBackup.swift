import ArgumentParser
import QCow2

/// `qimg backup --nbd URI [--sync=full|incremental] [--bitmap NAME] [-b PREV -F qcow2]
/// TARGET`: a backup pulled from an NBD export (the library's `PullBackup`). The one
/// positional argument is TARGET; errors about the export name the URI.
struct NBDBackup {
    let command: Backup
    let uri: String

    func run() throws {
        let c = command
        guard c.target == nil else {
            throw CommandFailure(message: "\(uri): with --nbd the only argument is TARGET (the export is the source)")
        }
        let target = c.source
        for (flag, given) in [("--repo", c.repo != nil), ("--name", c.chain != nil), ("--time", c.time != nil),
                              ("--full-every", c.fullEvery != nil), ("--log", c.log != nil), ("--output", c.output != .human),
                              ("--bitmap-mode", c.bitmapMode != nil), ("-f", c.sourceFormat != nil)] where given {
            throw CommandFailure(message: "\(uri): \(flag) cannot be used with --nbd")
        }
        let o = try c.backupOptions(sync: c.sync ?? "full", source: uri, target: target)
        guard o.sync == .full || o.sync == .incremental else {
            throw CommandFailure(message: "\(uri): an NBD export is backed up with --sync=full or --sync=incremental")
        }
        if let socket = c.live.qmp { return try runWithQMP(socket, options: o, target: target) }
        if !c.live.nodes.isEmpty { throw CommandFailure(message: "\(uri): --node applies only with --qmp") }
        if c.live.freeze != nil { throw CommandFailure(message: "\(uri): --freeze applies only with --qmp") }
        if c.live.timeout != nil { throw CommandFailure(message: "\(uri): --qmp-timeout applies only with --qmp") }
        let timeout = try c.pull.timeoutSeconds(uri)
        try c.perform(o, source: uri, target: target, exitCode: LiveExit.code(for:)) { o in
            // The export's bytes are a VM's disk: the backup is readable by its owner only.
            try StagedFile.$creationMode.withValue(0o600) {
                try PullBackup.run(uri: uri, target: target, options: o, timeout: timeout)
            }
        }
    }

    /// `--qmp SOCKET --node NODE --nbd URI`: qimg sets the export up in QEMU (a point-in-time
    /// view served at URI's address), pulls from it and tears it down (`FleecePull`).
    func runWithQMP(_ socket: String, options o: BackupOptions, target: String) throws {
        let c = command
        guard c.live.nodes.count == 1 else { throw CommandFailure(message: "\(socket): --qmp with --nbd needs exactly one --node NODE (the disk to back up)") }
        if o.sync == .incremental, o.bitmap == nil { throw CommandFailure(message: "\(socket): --sync=incremental needs --bitmap NAME") }
        let timeout = try c.pull.timeoutSeconds(uri)
        let freeze = c.live.guestFreeze
        let qmpTimeout = try c.live.timeoutSeconds(socket)
        try c.perform(o, source: uri, target: target, exitCode: LiveExit.code(for:), note: { FreezeNote.text(freeze) }) { o in
            try StagedFile.$creationMode.withValue(0o600) {
                try FleecePull.run(socket: socket, node: c.live.nodes[0], server: uri, target: target, options: o, timeout: timeout, freeze: freeze,
                                   qmpTimeout: qmpTimeout)
            }
        }
    }
}
