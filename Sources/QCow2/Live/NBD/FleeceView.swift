#if canImport(Glibc)
import Glibc
#endif

/// The QEMU side of a pull backup qimg sets up itself: a point-in-time view of a running
/// node exported over NBD. An overlay file (qcow2, beside the target) is attached backed
/// by the node; one transaction holds the bitmap's bits (`LiveActions.bitmapActions`) and
/// starts `blockdev-backup sync=none` node → overlay, so that QEMU copies every old
/// cluster into the overlay before a guest write replaces it; the overlay is exported
/// read-only with the hold bitmap. `stop` undoes it in QEMU's order (export, job, node,
/// server, file); the bitmap is left to the caller (`release` or `restore`).
final class FleeceView {
    let qmp: QMPConnection
    let node: LiveNode
    let plan: PushRun.BitmapPlan
    let server: NBDServerAddress
    let exportName: String
    /// The overlay's file: a temporary (never committed) beside the target, so that a
    /// killed run's is removed by the next run as any dead run's temporary file is.
    let fleeceFinal: String
    private var fleece: StagedFile?
    let fleeceNode = LiveNames.fleece()
    let job = LiveNames.job(0)
    let exportID = LiveNames.export()
    /// The guest's filesystems frozen around the transaction that creates the view.
    let freeze: GuestFreeze?
    private var attached = false, jobRunning = false, exported = false, startedServer = false
    /// The transaction ran: the bitmap's bits are held until `release` or `restore`.
    private(set) var held = false

    init(_ qmp: QMPConnection, node: LiveNode, plan: PushRun.BitmapPlan, server: NBDServerAddress, besides target: String,
         freeze: GuestFreeze? = nil) {
        self.qmp = qmp
        self.freeze = freeze
        self.node = node
        self.plan = plan
        self.server = server
        exportName = server.export.isEmpty ? exportID : server.export
        let dir = target.lastIndex(of: "/").map { String(target[...$0]) } ?? ""
        fleeceFinal = dir + LiveNames.fleeceFile
    }

    /// The URI libnbd reads the view from.
    var uri: String { server.uri(export: exportName) }

    /// The bitmap holding this run's bits (the export carries it for an incremental).
    var holdBitmap: String? {
        if case .hold(let name) = plan { return LiveNames.hold(name) }
        return nil
    }

    /// Sets the view up; on failure what was set up is undone (bitmap included).
    func start(exportBitmap: Bool, shouldStop: () -> Bool = { false }) throws {
        do {
            let staged = try StagedFile(final: fleeceFinal)
            fleece = staged
            var c = CreateOptions()
            c.format = .qcow2
            c.size = node.virtualSize
            try ImageCreator.create(staged.temporaryPath, options: c)
            let file = Sys.realpath(staged.temporaryPath) ?? staged.temporaryPath
            try qmp.execute("blockdev-add", [
                ("driver", .string("qcow2")), ("node-name", .string(fleeceNode)),
                ("file", .object([("driver", .string("file")), ("filename", .string(file))])), ("backing", .string(node.name))])
            attached = true
            let backup = LiveActions.action("blockdev-backup", [("job-id", .string(job)), ("device", .string(node.name)),
                                                                 ("target", .string(fleeceNode)), ("sync", .string("none"))])
            let actions = LiveActions.bitmapActions(plan, node: node.name) + [backup]
            let thawFailure = try GuestFreeze.bracket(freeze, stop: shouldStop) {
                try qmp.execute("transaction", [("actions", .array(actions))])
                jobRunning = true
                held = true
            }
            if let thawFailure { throw thawFailure }
            // A server already listening there (QEMU's own, or one a killed run started) is used as it is.
            if case .success = try qmp.tryExecute("nbd-server-start", [("addr", server.qmpAddress)]) { startedServer = true }
            var export: [(String, JSON)] = [("type", .string("nbd")), ("id", .string(exportID)), ("node-name", .string(fleeceNode)),
                                            ("name", .string(exportName)), ("writable", .bool(false))]
            if exportBitmap, let b = holdBitmap { export.append(("bitmaps", .array([.string(b)]))) }
            try qmp.execute("block-export-add", export)
            exported = true
        } catch {
            _ = try? stop()
            if held { try? restore() }
            throw error
        }
    }

    /// Whether the view still holds the point: its job runs (a failed job lets guest
    /// writes reach what the overlay shows).
    func intact() throws(QCow2Error) -> Bool {
        guard case .array(let jobs) = try qmp.execute("query-jobs") else { return false }
        return jobs.contains { $0["id"] == .string(job) && $0["status"] == .string("running") }
    }

    /// Tears the view down: export deleted, job cancelled, overlay detached and removed,
    /// the server stopped if this run started it.
    func stop() throws(QCow2Error) {
        if exported {
            try LiveCleanup.deleteExport(qmp, id: exportID)
            exported = false
        }
        if jobRunning {
            if case .success = try qmp.tryExecute("job-cancel", [("id", .string(job))]) {
                while let e = try qmp.nextEvent(), !(e.job == job && (e.name == "BLOCK_JOB_CANCELLED" || e.name == "BLOCK_JOB_COMPLETED")) {}
            }
            jobRunning = false
        }
        if attached {
            try qmp.execute("blockdev-del", [("node-name", .string(fleeceNode))])
            attached = false
        }
        if startedServer {
            _ = try qmp.tryExecute("nbd-server-stop")
            startedServer = false
        }
        fleece?.discard()
        fleece = nil
    }

    /// The backup is durable: the held bits are dropped (the bitmap keeps the writes made since).
    func release() throws(QCow2Error) {
        if let hold = holdBitmap {
            try qmp.execute("block-dirty-bitmap-remove", [("node", .string(node.name)), ("name", .string(hold))])
        }
        held = false
    }

    /// No backup was kept: the bitmap gets its held bits back (a bitmap this run added goes).
    func restore() throws(QCow2Error) {
        try LiveActions.restore(plan, node: node.name, qmp)
        held = false
    }
}
