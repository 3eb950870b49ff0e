#if canImport(Glibc)
import Glibc
#endif

/// One disk of a push backup: the node (or device/qdev) to copy and the file to write.
public struct LiveDisk: Sendable {
    public var node: String
    public var target: String
    /// The previous backup, written as TARGET's backing file (a name relative to TARGET's
    /// directory, as qemu-img writes it); nil for a standalone image.
    public var backingFile: String?
    public var backingFormat: ImageFormat?
    /// full, incremental or bitmap (top has no meaning for a running disk's chain here).
    public var sync: BackupOptions.Sync = .full
    public var bitmap: String?
    /// on-success or never (QEMU's `always` would clear bits of a target that is not kept).
    public var bitmapMode: BackupOptions.BitmapMode = .onSuccess
    /// A repository's point: once the target is durable, `bitmap` is renamed to this (its
    /// bits moved into a new bitmap of this name, in one transaction).
    public var renameBitmap: String?
    /// Bitmaps removed in that same transaction (a repository's stale job bitmaps).
    public var dropBitmaps: [String] = []

    public init(node: String, target: String, backingFile: String? = nil, backingFormat: ImageFormat? = nil) {
        self.node = node
        self.target = target
        self.backingFile = backingFile
        self.backingFormat = backingFormat
    }
}

public struct PushOptions {
    /// Cluster size and the other qcow2 options of the targets.
    public var create = CreateOptions()
    public var force = false
    /// Asked while the jobs run: true cancels them (nothing is kept, every bitmap intact).
    public var shouldStop: () -> Bool = { false }
    /// The guest's filesystems frozen around the transaction that starts the jobs.
    public var freeze: GuestFreeze?
    /// Seconds QEMU may take to answer a command (`QMPConnection`'s reply timeout).
    public var qmpTimeout = QMPConnection.defaultReplyTimeout
    public init() {}
}

public struct PushResult: Sendable {
    /// Bytes QEMU copied for each disk, in the order given.
    public var bytesCopied: [UInt64]
    public var seconds: Double
}

/// A push backup of a running QEMU's disks (QEMU writes the targets): each target is
/// created under a temporary name, attached with `blockdev-add`, and every disk's
/// `blockdev-backup` starts in one `transaction` together with its bitmap actions; when
/// every job has succeeded, the targets are detached (QEMU flushes them), made durable and
/// renamed into place, and only then are the bitmaps' old bits let go.
///
/// The bits: an incremental clears bitmap NAME in the transaction (so it records the
/// writes made from then on) after merging its bits into a hold bitmap (`qimg-hold:NAME`,
/// persistent, disabled) that the job copies. A failure, a cancel, a lost socket or a
/// killed run merges the hold back (the next run does it for the last three), so NAME
/// keeps every bit it had plus the writes made since. A full backup with NAME does the
/// same (its hold is not copied), or adds NAME in the transaction if it does not exist.
/// Several disks are all or none: one failing job cancels the others.
public enum PushBackup {
    public static func run(socket: String, disks: [LiveDisk], options o: PushOptions) throws -> PushResult {
        try validate(socket: socket, disks: disks, options: o)
        try o.freeze?.connect()
        let qmp = try QMPConnection(socket: socket, replyTimeout: o.qmpTimeout)
        defer { qmp.close() }
        try LiveCleanup.run(qmp)
        return try run(qmp, disks: disks, options: o)
    }

    /// The backup through a session already cleaned up; `recordDurable` runs once every
    /// target is durable and in place, before any bitmap lets its old bits go.
    static func run(_ qmp: QMPConnection, disks: [LiveDisk], options o: PushOptions,
                    recordDurable: () throws -> Void = {}) throws -> PushResult {
        let started = monotonicNanoseconds()
        let runs = try prepare(qmp, disks, o)
        defer { for r in runs { r.staged.discard() } }
        var jobs = PushJobs(qmp: qmp, runs: runs, options: o)
        let copied: [UInt64]
        do { copied = try jobs.run() } catch QCow2Error.live(let path, .connection, let detail) {
            let what = runs.count == 1 ? "\(runs[0].disk.target) was not written" : "no target was written"
            throw QCow2Error.live(path: path, problem: .connection, detail: "\(detail); \(what) (the next run removes what this one left in QEMU and gives the bitmap back its bits)")
        }
        // Every target is detached (flushed by QEMU): now durable, then in place.
        for r in runs {
            do {
                let f = try BlockFile(path: r.staged.temporaryPath)
                try f.fullSync()
            } catch let e as QCow2Error { throw e.withPath(r.disk.target) }
            try r.staged.commit(replacing: o.force, durable: true)
        }
        try recordDurable()
        try jobs.releaseHolds()
        return PushResult(bytesCopied: copied, seconds: Double(monotonicNanoseconds() - started) / 1e9)
    }

    static func validate(socket: String, disks: [LiveDisk], options o: PushOptions) throws {
        func invalid(_ m: String) -> QCow2Error { .invalidArgument(path: socket, detail: m) }
        guard !disks.isEmpty else { throw invalid("no disk to back up") }
        var seen = Set<String>()
        for d in disks {
            switch d.sync {
            case .top: throw invalid("sync=top is not available for a running disk (use full, incremental or bitmap)")
            case .incremental, .bitmap:
                guard d.bitmap != nil else { throw invalid("a backup with sync=\(d.sync.rawValue) needs a bitmap") }
            case .full: break
            }
            if d.bitmapMode != .onSuccess && d.sync != .bitmap { throw invalid("a bitmap mode applies only to sync=bitmap") }
            if d.bitmapMode == .always {
                throw invalid("bitmap mode 'always' is not available for a running disk: a failed run keeps no target, so the bits it cleared would be lost (use on-success)")
            }
            guard seen.insert(d.node).inserted else { throw invalid("node '\(d.node)' is given twice") }
            var st = stat()
            guard Sys.stat(d.target, &st) == 0 else { continue }
            if (st.st_mode & S_IFMT) == S_IFDIR { throw QCow2Error.invalidArgument(path: d.target, detail: "is a directory") }
            if !o.force { throw QCow2Error.targetExists(path: d.target) }
        }
    }

    /// Each disk's node found and checked, and its target created (not yet attached).
    static func prepare(_ qmp: QMPConnection, _ disks: [LiveDisk], _ o: PushOptions) throws -> [PushRun] {
        var runs: [PushRun] = []
        for (i, d) in disks.enumerated() {
            let node = try LiveNodes.find(d.node, qmp)
            let plan = try bitmapPlan(qmp, node, d)
            if let b = d.backingFile {
                let loc = try BackingName.locate(b, format: d.backingFormat, relativeTo: d.target)
                let prev = try ImageOpener().open(loc.path, format: loc.format)
                guard prev.virtualSize == node.virtualSize else {
                    throw QCow2Error.invalidArgument(path: b, detail: "the backing file's size (\(prev.virtualSize)) differs from node '\(node.name)''s (\(node.virtualSize))")
                }
            }
            let staged = try StagedFile(final: d.target)
            var c = o.create
            c.format = .qcow2
            c.size = node.virtualSize
            c.backingFile = d.backingFile
            c.backingFormat = d.backingFile == nil ? nil : (d.backingFormat ?? .qcow2).rawValue
            do { try ImageCreator.create(staged.temporaryPath, options: c) } catch let e as QCow2Error {
                throw e.path == staged.temporaryPath ? e.withPath(d.target) : e
            }
            runs.append(PushRun(index: i, disk: d, node: node, plan: plan, staged: staged))
        }
        return runs
    }

    /// What happens to the bitmap of `node`, after checking it can be used.
    static func bitmapPlan(_ qmp: QMPConnection, _ node: LiveNode, _ o: LiveDisk) throws(QCow2Error) -> PushRun.BitmapPlan {
        guard let name = o.bitmap else { return .none }
        guard let b = node.bitmap(name) else {
            if o.sync == .full { return .create(name) }
            throw qmp.fail(.bitmapNotFound, "node '\(node.name)' has no bitmap '\(name)'")
        }
        if b.inconsistent {
            throw qmp.fail(.bitmapInconsistent, "bitmap '\(name)' of node '\(node.name)' is inconsistent (QEMU stopped without storing it); remove it and take a full backup with a new bitmap")
        }
        if b.busy { throw qmp.fail(.bitmapBusy, "bitmap '\(name)' of node '\(node.name)' is in use by another job or export") }
        if !b.recording {
            throw qmp.fail(.bitmapDisabled, "bitmap '\(name)' of node '\(node.name)' is disabled: it has not recorded every write")
        }
        if node.bitmap(LiveNames.hold(name)) != nil {
            throw qmp.fail(.bitmapBusy, "bitmap '\(name)' of node '\(node.name)' is held by bitmap '\(LiveNames.hold(name))', which could not be merged back")
        }
        return o.sync == .bitmap && o.bitmapMode == .never ? .readOnly(name) : .hold(name)
    }
}

/// One disk's run: its node, target file, and the names it uses inside QEMU.
final class PushRun {
    enum BitmapPlan: Equatable {
        /// No bitmap.
        case none
        /// A full backup adds the bitmap in the transaction (removed again on failure).
        case create(String)
        /// The bitmap's bits move to its hold bitmap in the transaction and the bitmap is
        /// cleared; they are merged back on failure, dropped once the target is durable.
        case hold(String)
        /// sync=bitmap, bitmap-mode=never: the bitmap is copied and left alone.
        case readOnly(String)
    }

    let index: Int
    let disk: LiveDisk
    let node: LiveNode
    let plan: BitmapPlan
    let staged: StagedFile
    let job: String
    let targetNode: String

    init(index: Int, disk: LiveDisk, node: LiveNode, plan: BitmapPlan, staged: StagedFile) {
        self.index = index
        self.disk = disk
        self.node = node
        self.plan = plan
        self.staged = staged
        job = LiveNames.job(index)
        targetNode = LiveNames.target(index)
    }
}
