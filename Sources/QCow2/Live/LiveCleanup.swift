#if canImport(Glibc)
import Glibc
#endif

/// The names qimg gives what it creates inside a running QEMU, so that a later run finds
/// what a killed run left behind: jobs and nodes start with `qimg-`, and the bitmap that
/// holds a run's bits until its target is durable is `qimg-hold:NAME` beside bitmap NAME.
public enum LiveNames {
    public static let prefix = "qimg-"
    static let holdPrefix = "qimg-hold:"

    static func job(_ index: Int) -> String { "\(prefix)backup-\(getpid())-\(index)" }
    static func target(_ index: Int) -> String { "\(prefix)target-\(getpid())-\(index)" }
    static func hold(_ bitmap: String) -> String { holdPrefix + bitmap }
    /// A pull backup's point-in-time view: its overlay node, its file (beside the target)
    /// and its NBD export's id and name.
    static func fleece() -> String { "\(prefix)fleece-\(getpid())" }
    static let fleeceFile = ".\(prefix)fleece.qcow2"
    static func export() -> String { "\(prefix)export-\(getpid())" }

    /// The bitmap a hold bitmap's bits belong to.
    static func heldBitmap(_ hold: String) -> String? {
        hold.hasPrefix(holdPrefix) ? String(hold.dropFirst(holdPrefix.count)) : nil
    }
}

/// Removes what earlier runs left in QEMU (they were killed, or lost the socket): their
/// NBD exports deleted, their jobs cancelled and dismissed, their target and view nodes
/// detached (a view's overlay file removed too), and their hold bitmaps
/// merged back into the bitmaps they came from (so those keep every bit). QEMU serves one
/// monitor client at a time, so nothing found here belongs to a live run.
public enum LiveCleanup {
    public struct Removed: Sendable, Equatable {
        public var exports = 0, jobs = 0, nodes = 0, holds = 0
    }

    @discardableResult
    public static func run(_ qmp: QMPConnection) throws(QCow2Error) -> Removed {
        var removed = Removed()
        removed.exports = try endExports(qmp)
        removed.jobs = try endJobs(qmp)
        for node in try LiveNodes.all(qmp) {
            if node.name.hasPrefix(LiveNames.prefix) {
                if case .success = try qmp.tryExecute("blockdev-del", [("node-name", .string(node.name))]) {
                    removed.nodes += 1
                    if let f = node.file, f.split(separator: "/").last?.hasPrefix(LiveNames.fleeceFile) == true { _ = Sys.unlink(f) }
                }
                continue
            }
            for b in node.bitmaps {
                guard let owner = LiveNames.heldBitmap(b.name) else { continue }
                try releaseHold(qmp, node: node.name, hold: b.name, mergingInto: node.bitmap(owner) != nil ? owner : nil)
                removed.holds += 1
            }
        }
        return removed
    }

    /// Removes a hold bitmap, first merging its bits into `owner` (one transaction).
    static func releaseHold(_ qmp: QMPConnection, node: String, hold: String, mergingInto owner: String?) throws(QCow2Error) {
        var actions: [JSON] = []
        if let owner {
            actions.append(LiveActions.action("block-dirty-bitmap-merge", [
                ("node", .string(node)), ("target", .string(owner)), ("bitmaps", .array([.string(hold)]))]))
        }
        actions.append(LiveActions.action("block-dirty-bitmap-remove", [("node", .string(node)), ("name", .string(hold))]))
        try qmp.execute("transaction", [("actions", .array(actions))])
    }

    /// Deletes qimg's NBD exports and waits until QEMU has let each go; returns how many.
    static func endExports(_ qmp: QMPConnection) throws(QCow2Error) -> Int {
        guard case .array(let exports) = try qmp.execute("query-block-exports") else { return 0 }
        var ended = 0
        for x in exports {
            guard case .string(let id)? = x["id"], id.hasPrefix(LiveNames.prefix) else { continue }
            try deleteExport(qmp, id: id)
            ended += 1
        }
        return ended
    }

    /// Deletes export `id` (its clients are disconnected) and waits for BLOCK_EXPORT_DELETED.
    static func deleteExport(_ qmp: QMPConnection, id: String) throws(QCow2Error) {
        try qmp.execute("block-export-del", [("id", .string(id)), ("mode", .string("hard"))])
        while true {
            guard let e = try qmp.nextEvent() else { continue }
            if e.name == "BLOCK_EXPORT_DELETED" && e.job == id { return }
        }
    }

    /// Cancels qimg's jobs that still run and dismisses every one; returns how many.
    static func endJobs(_ qmp: QMPConnection) throws(QCow2Error) -> Int {
        var ended = 0
        while true {
            let jobs = try qimgJobs(qmp)
            if jobs.isEmpty { return ended }
            var waiting = false
            for (id, status) in jobs {
                switch status {
                case "concluded":
                    try qmp.execute("job-dismiss", [("id", .string(id))])
                    ended += 1
                case "aborting", "null":
                    waiting = true
                default:
                    if case .failure(let refusal) = try qmp.tryExecute("job-cancel", [("id", .string(id))]) {
                        throw qmp.fail(.protocolError, "job '\(id)' left by an earlier run cannot be cancelled: \(refusal.description)")
                    }
                    waiting = true
                }
            }
            // Wait for the next status change before looking again.
            if waiting { _ = try qmp.nextEvent() }
        }
    }

    static func qimgJobs(_ qmp: QMPConnection) throws(QCow2Error) -> [(String, String)] {
        guard case .array(let jobs) = try qmp.execute("query-jobs") else { return [] }
        return jobs.compactMap { j in
            guard case .string(let id)? = j["id"], id.hasPrefix(LiveNames.prefix),
                  case .string(let status)? = j["status"] else { return nil }
            return (id, status)
        }
    }
}

/// Transaction actions and job arguments as QMP takes them.
enum LiveActions {
    static func action(_ type: String, _ data: [(String, JSON)]) -> JSON {
        .object([("type", .string(type)), ("data", .object(data))])
    }

    /// A run's bitmap actions, before its job in the transaction: a full backup adds the
    /// bitmap; a held bitmap's bits move to its (persistent, disabled) hold bitmap and the
    /// bitmap is cleared, so that it records the writes made from then on.
    static func bitmapActions(_ plan: PushRun.BitmapPlan, node name: String) -> [JSON] {
        let node = JSON.string(name)
        switch plan {
        case .none, .readOnly: return []
        case .create(let bitmap):
            return [action("block-dirty-bitmap-add", [("node", node), ("name", .string(bitmap)), ("persistent", .bool(true))])]
        case .hold(let bitmap):
            let hold = JSON.string(LiveNames.hold(bitmap))
            return [action("block-dirty-bitmap-add", [("node", node), ("name", hold), ("persistent", .bool(true)), ("disabled", .bool(true))]),
                    action("block-dirty-bitmap-merge", [("node", node), ("target", hold), ("bitmaps", .array([.string(bitmap)]))]),
                    action("block-dirty-bitmap-clear", [("node", node), ("name", .string(bitmap))])]
        }
    }

    /// Undoes `bitmapActions` after a failure: the hold merged back, an added bitmap removed.
    static func restore(_ plan: PushRun.BitmapPlan, node: String, _ qmp: QMPConnection) throws(QCow2Error) {
        switch plan {
        case .hold(let name):
            try LiveCleanup.releaseHold(qmp, node: node, hold: LiveNames.hold(name), mergingInto: name)
        case .create(let name):
            _ = try qmp.tryExecute("block-dirty-bitmap-remove", [("node", .string(node)), ("name", .string(name))])
        case .none, .readOnly:
            break
        }
    }
}
