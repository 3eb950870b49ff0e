#if canImport(Glibc)
import Glibc
#endif

/// `qimg backup --qmp SOCKET --node NODE --nbd URI TARGET`: a pull backup whose export qimg
/// sets up in the running QEMU itself (`FleeceView`: a point-in-time view served where URI
/// says) and reads with `PullBackup` (libnbd, the same copy as `--nbd` alone). Order: the
/// view starts (bitmap held in its transaction), the target is written and made durable,
/// the view is torn down, and only then are the held bits dropped; any failure tears the
/// view down and merges them back. A killed run's export, job, overlay and hold are
/// removed or merged back by the next run (`LiveCleanup`), before it starts.
public enum FleecePull {
    public static func run(socket: String, node name: String, server uri: String, target: String,
                           options o: BackupOptions, timeout: Double = NBDClient.defaultTimeout,
                           freeze: GuestFreeze? = nil, qmpTimeout: Double = QMPConnection.defaultReplyTimeout) throws -> BackupResult {
        let server = try NBDServerAddress(uri: uri)
        try PullBackup.validate(uri: uri, options: { var v = o; v.bitmap = nil; return v }())
        if o.sync == .incremental && o.bitmap == nil {
            throw QCow2Error.invalidArgument(path: socket, detail: "a backup with sync=incremental needs a bitmap")
        }
        try freeze?.connect()
        let qmp = try QMPConnection(socket: socket, replyTimeout: qmpTimeout)
        defer { qmp.close() }
        try LiveCleanup.run(qmp)
        let node = try LiveNodes.find(name, qmp)
        var disk = LiveDisk(node: name, target: target)
        disk.sync = o.sync
        disk.bitmap = o.bitmap
        let view = FleeceView(qmp, node: node, plan: try PushBackup.bitmapPlan(qmp, node, disk), server: server, besides: target,
                             freeze: freeze)
        try view.start(exportBitmap: o.sync == .incremental, shouldStop: o.shouldStop)
        var pull = o
        pull.bitmap = o.sync == .incremental ? view.holdBitmap : nil
        let result: BackupResult
        do {
            // A job that ended let guest writes through to the view: the copy is not the point,
            // and it is refused before it is renamed into place (nothing at TARGET changes).
            result = try PullBackup.run(uri: view.uri, target: target, options: pull, timeout: timeout) {
                guard try view.intact() else {
                    throw qmp.fail(.jobFailed, "the point-in-time view of node '\(node.name)' ended during the copy; \(target) was not written and the bitmap keeps its bits")
                }
            }
        } catch {
            try? view.stop()
            try? view.restore()
            throw error
        }
        try view.stop()
        try view.release()
        return result
    }
}
