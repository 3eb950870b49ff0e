import ArgumentParser
import QCow2

struct Backup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backup",
        abstract: "Back up an image into a new qcow2 overlay (full, top, or the clusters a dirty bitmap marks).",
        discussion: """
            sync=full: every allocated byte (chain flattened); with --bitmap, the bitmap is created if missing \
            and cleared on success. sync=top: what the top image holds. sync=incremental (or dirty-bitmap): \
            only the clusters the bitmap marks, cleared on success. sync=bitmap: like incremental, with \
            --bitmap-mode on-success|always|never. An incremental or bitmap backup needs -b (the previous \
            backup) unless --no-backing asks for a standalone delta. TARGET is written under a temporary \
            name (TARGET.PID-TOKEN.qimg-tmp), fsynced and renamed; the bitmap changes only after that. \
            A target that is the source, the -b file or a file of their backing chains is refused, \
            --force or not.

            Repository mode (qimg backup --repo DIR --bitmap=NAME [--name CHAIN] [--time ISO-8601] \
            [--full-every N|Nd] [--lock-wait SECONDS] IMAGE): no TARGET and no --sync; qimg takes a full backup or an \
            incremental on the chain's newest point by itself, records the point in DIR's manifest \
            and prints a one-line summary on stderr (or appends it to --log FILE); see Docs/backup.md. \
            A run that finds the repository locked by another run waits for it up to --lock-wait \
            seconds (default \(Int(LockWaitOption.defaultSeconds)); 0: no wait), then exits 3; it never \
            touches the other run's files.

            Pull mode (qimg backup --nbd URI [--sync=full|incremental] [--bitmap NAME] [-b PREV -F qcow2] \
            TARGET): the source is an NBD export (qemu-nbd -B, QEMU's or libvirt's pull-mode export); \
            incremental copies what its qemu:dirty-bitmap:NAME context marks, and the export's bitmap is \
            left to its owner; see Docs/live-backup.md. --nbd-timeout SECONDS (default \(Int(NBDClient.defaultTimeout))): a server \
            that sends nothing for that long (handshake or request) fails the run. With --qmp SOCKET --node NODE as well, URI is \
            where QEMU serves NBD (nbd+unix:///?socket=PATH): qimg exports a point-in-time view of NODE \
            there itself, tears it down, and releases --bitmap NAME only once TARGET is durable.

            Running VM (qimg backup --qmp SOCKET --node NODE [--sync=full|incremental|bitmap] [--bitmap NAME] \
            [-b PREV -F qcow2] TARGET): QEMU copies the node into TARGET (push mode); see Docs/live-backup.md. \
            --freeze QGA_SOCKET (with --qmp, also with --repo or --nbd): the guest's filesystems are frozen \
            through its QEMU guest agent for the start of the backup only, and thawed right after. \
            --qmp-timeout SECONDS (default \(Int(QMPConnection.defaultReplyTimeout))): QEMU leaving a command unanswered for \
            that long (a stopped or hung VM) fails the run (exit 10).

            \(ExitStatus.interruptible) In repository mode: \(RepoExit.codes) \(LiveExit.codes)
            """)

    @Option(name: .customLong("sync"), help: ArgumentHelp("full, top, incremental (dirty-bitmap) or bitmap.", valueName: "mode")) var sync: String?
    @Option(name: .customLong("bitmap"), help: ArgumentHelp("The persistent dirty bitmap to use.", valueName: "name")) var bitmap: String?
    @Option(name: .customLong("bitmap-mode"), help: ArgumentHelp("on-success, always or never (sync=bitmap).", valueName: "mode")) var bitmapMode: String?
    @Option(name: .customShort("b"), help: ArgumentHelp("Backing file of TARGET (normally the previous backup).", valueName: "backing_file")) var backing: String?
    @Option(name: .customShort("F"), help: ArgumentHelp("Format of the backing file.", valueName: "backing_fmt")) var backingFormat: String?
    @Option(name: .customShort("f"), help: ArgumentHelp("Format of SOURCE.", valueName: "fmt")) var sourceFormat: String?
    @Option(name: .customShort("o"), help: ArgumentHelp("Create options of TARGET (cluster_size=..., ...).", valueName: "options")) var options: [String] = []
    @Flag(name: .customShort("c"), help: "Write compressed clusters.") var compress = false
    @OptionGroup var zlib: ZlibOption
    @Flag(name: .customShort("p"), help: "Show progress.") var showProgress = false
    @Flag(name: .customShort("q"), help: "Quiet: no summary line.") var quiet = false
    @Option(name: .customLong("speed"), help: ArgumentHelp("Limit throughput (bytes per second; k, M, G suffixes).", valueName: "bytes_per_sec")) var speed: SizeArgument?
    @Flag(name: .customLong("force"), help: "Replace an existing TARGET.") var force = false
    @Flag(name: .customLong("no-backing"), help: "Allow an incremental or bitmap backup without -b: a delta that reads as zeros wherever nothing changed.") var noBacking = false
    @Option(name: .customLong("repo"), help: ArgumentHelp("Back up into this repository (full or incremental chosen by qimg).", valueName: "dir")) var repo: String?
    @Option(name: .customLong("name"), help: ArgumentHelp("Repository mode: the chain's name (default: the image's file name; with --qmp, once per --node, default the node's name).", valueName: "chain")) var chains: [String] = []
    /// The one chain name of an offline repository run.
    var chain: String? { chains.last }
    @Option(name: .customLong("time"), help: ArgumentHelp("Repository mode: record the point with this time (ISO-8601; UTC unless an offset is given).", valueName: "time")) var time: String?
    @Option(name: .customLong("full-every"), help: ArgumentHelp("Repository mode: a full backup every N points (N) or N days (Nd).", valueName: "N|Nd")) var fullEvery: String?
    @Option(name: .customLong("output"), help: ArgumentHelp("Repository mode: human or json (the point made, on stdout).", valueName: "fmt")) var output: OutputFormat = .human
    @Option(name: .customLong("log"), help: ArgumentHelp("Repository mode: append the summary line to this file instead of stderr.", valueName: "file")) var log: String?
    @OptionGroup var lockWait: LockWaitOption
    @OptionGroup var live: LiveOptions
    @Argument(help: "The image to back up (with --qmp: TARGET).") var source: String = ""
    @Argument(help: "The backup image to write (not in repository mode).") var target: String?

    static let advice = ErrorText.Advice(
        inUseByOthers: "back up a running VM through its QEMU with --qmp SOCKET --node NODE (or read its NBD export with --nbd URI)",
        bitmapInconsistent: "remove it with 'qimg bitmap --remove' and take a full backup with a new bitmap")

    @OptionGroup var pull: NBDOptions

    func run() throws {
        _ = try zlib.resolved(compress: compress, file: live.qmp ?? source)
        if let uri = pull.nbd { return try NBDBackup(command: self, uri: uri).run() }
        if pull.timeout != nil { throw CommandFailure(message: "\(live.qmp ?? source): --nbd-timeout applies only with --nbd") }
        if let qmp = live.qmp { return try LiveBackup(command: self, socket: qmp).run() }
        if !live.nodes.isEmpty { throw CommandFailure(message: "\(source): --node applies only with --qmp") }
        if live.freeze != nil { throw CommandFailure(message: "\(source): --freeze applies only with --qmp") }
        if live.timeout != nil { throw CommandFailure(message: "\(source): --qmp-timeout applies only with --qmp") }
        guard !source.isEmpty else { throw CommandFailure(message: "an IMAGE to back up is required") }
        if chains.count > 1 { throw CommandFailure(message: "\(source): --name is given once (several only with --qmp, one per --node)") }
        if let repo { return try RepoBackup(command: self, repo: repo).run() }
        guard let sync, let target else {
            throw CommandFailure(message: "\(source): " + (sync == nil ? "--sync is required (or --repo DIR)" : "a TARGET is required (or --repo DIR)"))
        }
        for (flag, given) in [("--name", chain != nil), ("--time", time != nil), ("--full-every", fullEvery != nil), ("--log", log != nil), ("--output", output != .human), ("--lock-wait", lockWait.seconds != nil)] where given {
            throw CommandFailure(message: "\(source): \(flag) applies only with --repo")
        }
        var o = try backupOptions(sync: sync, source: source, target: target)
        if let m = bitmapMode {
            guard let mode = BackupOptions.BitmapMode(rawValue: m) else {
                throw CommandFailure(message: "\(source): invalid bitmap mode '\(m)' (on-success, always, never)")
            }
            o.bitmapMode = mode
        }
        o.sourceFormat = try sourceFormat.map { try ImageFormat(name: $0, path: source) }
        try perform(o, source: source, target: target) { o in
            // The backup is never readable by more users than the image.
            try StagedFile.$creationMode.withValue(FileModes.permissions(of: source)) {
                try BackupOperation.run(source: source, target: target, options: o)
            }
        }
    }

    /// The options a backup into TARGET shares with the pull mode: sync, bitmap, -b/-F or
    /// --no-backing, TARGET's create options, compression, speed, --force.
    func backupOptions(sync: String, source: String, target: String) throws -> BackupOptions {
        var o = BackupOptions()
        let syncName = sync == "dirty-bitmap" ? "incremental" : sync
        guard let s = BackupOptions.Sync(rawValue: syncName) else {
            throw CommandFailure(message: "\(source): invalid sync mode '\(sync)' (full, top, incremental, bitmap)")
        }
        o.sync = s
        o.bitmap = bitmap
        if s == .incremental || s == .bitmap, backing == nil, !noBacking {
            throw CommandFailure(message: "\(source): sync=\(sync) needs -b PREV (the previous backup, whose contents the new one builds on); --no-backing makes a delta that reads as zeros wherever nothing changed")
        }
        if noBacking && backing != nil {
            throw CommandFailure(message: "\(source): --no-backing and -b cannot be used together")
        }
        o.allowNoBacking = noBacking
        o.backingFile = backing
        o.backingFormat = try backingFormat.map { try ImageFormat(name: $0, path: backing ?? "") }
        o.create = try targetCreateOptions(target)
        o.compressed = compress
        o.zlibEncoder = try zlib.resolved(compress: compress, file: source)
        o.speed = speed?.value ?? 0
        o.force = force
        return o
    }

    /// Runs `body` with progress, interruption and error lines set up, then prints the
    /// summary line (errors and interruptions name `source`; `exitCode` chooses a failure's code),
    /// `note` at its end.
    func perform(_ options: BackupOptions, source: String, target: String, exitCode: (QCow2Error) -> Int32 = { _ in 1 },
                 note: () -> String = { "" },
                 _ body: (BackupOptions) throws -> BackupResult) throws {
        var o = options
        let bar = ProgressReporter(enabled: showProgress && !quiet)
        o.progress = { bar.update($0, $1) }
        o.shouldStop = { Interruption.requested }
        Interruption.install()

        let r: BackupResult
        do {
            r = try body(o)
        } catch {
            bar.finish(succeeded: false)
            if Interruption.requested {
                if case QCow2Error.incomplete(_, _, let kept) = error { throw Interruption.failure(source, kept) }
                throw Interruption.failure(source, "\(target) was not written and the bitmap is unchanged")
            }
            if let e = error as? QCow2Error { throw CommandFailure(message: ErrorText.line(e, advice: Self.advice), exitCode: exitCode(e)) }
            throw error
        }
        bar.finish(succeeded: true)
        if !quiet {
            let rate = r.seconds > 0 ? UInt64(Double(r.bytesToCopy) / r.seconds) : 0
            Output.out("Backup complete: \(target): \(r.bytesToCopy) bytes in \(r.clusters) clusters copied (\(Human.size(r.bytesWritten)) of data) in \(Human.format("%.2f", r.seconds)) s (\(Human.size(rate))/s)\(note())\n")
        }
    }
}

extension Backup {
    /// TARGET's create options from -o.
    func targetCreateOptions(_ target: String) throws -> CreateOptions {
        var c = CreateOptions()
        let list = try OptionList(options)
        for (k, _) in list.values where !["cluster_size", "compat", "refcount_bits", "lazy_refcounts", "extended_l2", "compression_type"].contains(k) {
            throw CommandFailure(message: "\(target): Invalid parameter '\(k)'")
        }
        if let late = try list.applyQCow2Options(to: &c) { throw CommandFailure(message: "\(target): \(late)") }
        do { try c.validate(path: target) } catch { throw CommandFailure(message: error.description) }
        return c
    }
}
