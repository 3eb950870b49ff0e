/// The QEMU side of a push backup: targets attached, one transaction starting every job
/// with its bitmap actions, the jobs followed to their end (one failing or a stop request
/// cancels all), jobs dismissed and targets detached; on failure every bitmap is given
/// back its bits before the error is thrown.
struct PushJobs {
    let qmp: QMPConnection
    let runs: [PushRun]
    let options: PushOptions
    private var attached: [PushRun] = []

    init(qmp: QMPConnection, runs: [PushRun], options: PushOptions) {
        self.qmp = qmp
        self.runs = runs
        self.options = options
    }

    /// Runs every job; returns the bytes each copied. On return the targets are detached.
    mutating func run() throws -> [UInt64] {
        // A thaw that failed after the jobs started: they are cancelled, nothing is kept.
        var thawFailure: QCow2Error?
        do {
            try attach()
            if options.shouldStop() { throw qmp.fail(.cancelled, "cancelled before the backup started") }
            let steps = runs.flatMap(actions)
            thawFailure = try GuestFreeze.bracket(options.freeze, stop: options.shouldStop) { [qmp] in
                try qmp.execute("transaction", [("actions", .array(steps))])
            }
        } catch {
            detach()
            throw error
        }
        // From here on the bitmaps' bits are held: every failure gives them back (if the
        // session is gone, `follow` throws and the next run ends the jobs and merges back).
        let outcome = try follow(abort: thawFailure != nil)
        for r in runs { _ = try qmp.tryExecute("job-dismiss", [("id", .string(r.job))]) }
        if runs.allSatisfy({ if case .completed? = outcome[$0.job] { return true }; return false }) { writeBack() }
        detach()
        let failed = runs.compactMap { r -> (PushRun, String, Bool)? in
            if case .failed(let why, let writing)? = outcome[r.job] { return (r, why, writing) }
            return nil
        }
        let cancelled = runs.contains { if case .cancelled? = outcome[$0.job] { return true }; return false }
        if !failed.isEmpty || cancelled || attached.count > 0 || thawFailure != nil {
            try restoreBitmaps()
            if let thawFailure { throw thawFailure }
            let kept = runs.count == 1 ? "\(runs[0].disk.target) was not written and the bitmap keeps its bits" : "no target was written and every bitmap keeps its bits"
            if let (r, why, writing) = failed.first {
                throw qmp.fail(writing ? .targetFailed : .jobFailed, "backup of node '\(r.node.name)' failed: \(why); \(kept)")
            }
            if cancelled { throw qmp.fail(.cancelled, "backup cancelled; \(kept)") }
            throw qmp.fail(.protocolError, "a target could not be detached; \(kept)")
        }
        return runs.map { if case .completed(let n)? = outcome[$0.job] { return n }; return 0 }
    }

    /// Drops the held bits, once every target is durable and in place (and renames a
    /// repository's bitmap to its new point's name), in one transaction per disk.
    func releaseHolds() throws(QCow2Error) {
        for r in runs {
            let node = JSON.string(r.node.name)
            func remove(_ name: String) -> JSON { LiveActions.action("block-dirty-bitmap-remove", [("node", node), ("name", .string(name))]) }
            var actions: [JSON] = []
            if case .hold(let name) = r.plan {
                if let new = r.disk.renameBitmap {
                    var add: [(String, JSON)] = [("node", node), ("name", .string(new)), ("persistent", .bool(true))]
                    if let g = r.node.bitmap(name)?.granularity { add.append(("granularity", .uint(g))) }
                    actions.append(LiveActions.action("block-dirty-bitmap-add", add))
                    actions.append(LiveActions.action("block-dirty-bitmap-merge", [("node", node), ("target", .string(new)), ("bitmaps", .array([.string(name)]))]))
                    actions.append(remove(name))
                }
                actions.append(remove(LiveNames.hold(name)))
            }
            actions += r.disk.dropBitmaps.map(remove)
            if !actions.isEmpty { try qmp.execute("transaction", [("actions", .array(actions))]) }
        }
    }

    // MARK: - Steps

    private mutating func attach() throws(QCow2Error) {
        for r in runs {
            let file = Sys.realpath(r.staged.temporaryPath) ?? r.staged.temporaryPath
            try qmp.execute("blockdev-add", [
                ("driver", .string("qcow2")), ("node-name", .string(r.targetNode)),
                ("file", .object([("driver", .string("file")), ("filename", .string(file))])),
                // The previous backup stays closed (and unlocked): QEMU writes the top layer only.
                ("backing", .null)])
            attached.append(r)
        }
    }

    /// QEMU flushes a target inside `blockdev-del`, where the monitor answers nothing until
    /// the data QEMU wrote is on disk: that is written here first (the same page-cache
    /// pages), so that the detach has only QEMU's cached metadata left and answers within
    /// the reply timeout however large the backup. A failure here shows in the full sync
    /// that follows the detach.
    private func writeBack() {
        for r in runs { try? BlockFile(path: r.staged.temporaryPath).sync() }
    }

    /// Detaches the attached targets (QEMU writes its cached metadata and syncs them);
    /// a target that cannot be detached stays in `attached`.
    private mutating func detach() {
        attached = attached.filter { r in
            guard let result = try? qmp.tryExecute("blockdev-del", [("node-name", .string(r.targetNode))]) else { return true }
            if case .success = result { return false }
            return true
        }
    }

    /// The transaction actions of one disk: its bitmap actions, then its job.
    private func actions(_ r: PushRun) -> [JSON] {
        var list = LiveActions.bitmapActions(r.plan, node: r.node.name)
        // The bitmap the job copies: the hold (incremental, bitmap) or NAME (bitmap-mode=never).
        var copied: String?
        switch r.plan {
        case .hold(let name) where r.disk.sync != .full: copied = LiveNames.hold(name)
        case .readOnly(let name): copied = name
        default: break
        }
        var job: [(String, JSON)] = [("job-id", .string(r.job)), ("device", .string(r.node.name)), ("target", .string(r.targetNode)),
                                     ("sync", .string(copied == nil ? "full" : "bitmap")), ("auto-dismiss", .bool(false))]
        if let copied { job += [("bitmap", .string(copied)), ("bitmap-mode", .string("never"))] }
        list.append(LiveActions.action("blockdev-backup", job))
        return list
    }

    /// How a job ended; a failed one says whether it failed writing its target (QEMU's
    /// BLOCK_JOB_ERROR with operation `write`: no space, an I/O error on the target).
    enum JobEnd { case completed(UInt64), failed(String, writing: Bool), cancelled }

    /// Follows the jobs' events until every job has ended; a failure or a stop request
    /// (or `abort`) cancels the jobs still running.
    private func follow(abort: Bool) throws(QCow2Error) -> [String: JobEnd] {
        let ids = Set(runs.map(\.job))
        var ends: [String: JobEnd] = [:]
        var writeErrors = Set<String>()
        var cancelling = false
        while ends.count < ids.count {
            let stop = options.shouldStop
            guard let e = try qmp.nextEvent(stopping: { !cancelling && (abort || stop()) }) else {
                cancelling = true
                cancel(ids.subtracting(ends.keys))
                continue
            }
            guard let job = e.job, ids.contains(job), ends[job] == nil else { continue }
            switch e.name {
            case "BLOCK_JOB_ERROR":
                if e.data["operation"] == .string("write") { writeErrors.insert(job) }
                continue
            case "BLOCK_JOB_COMPLETED":
                if case .string(let why)? = e.data["error"] {
                    ends[job] = .failed(why, writing: writeErrors.contains(job))
                } else {
                    ends[job] = .completed(e.data["offset"]?.uint64 ?? 0)
                }
            case "BLOCK_JOB_CANCELLED":
                ends[job] = .cancelled
            default:
                continue
            }
            if case .completed = ends[job] { continue }
            if !cancelling {
                cancelling = true
                cancel(ids.subtracting(ends.keys))
            }
        }
        return ends
    }

    private func cancel(_ jobs: Set<String>) {
        for j in jobs.sorted() { _ = try? qmp.tryExecute("job-cancel", [("id", .string(j))]) }
    }

    /// Gives every bitmap back what it had: holds merged back, bitmaps this run added removed.
    private func restoreBitmaps() throws(QCow2Error) {
        for r in runs { try LiveActions.restore(r.plan, node: r.node.name, qmp) }
    }
}
