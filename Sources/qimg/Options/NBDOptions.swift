import ArgumentParser
import QCow2

/// `backup --nbd URI`: the pull mode's options (Commands/NBDBackup.swift runs it).
struct NBDOptions: ParsableArguments {
    @Option(name: .customLong("nbd"), help: ArgumentHelp(
        "Pull mode: back up this NBD export (nbd+unix:///EXPORT?socket=PATH, nbd://HOST:PORT/EXPORT); the only argument is TARGET. With --qmp and --node: where QEMU serves NBD (qimg sets the export up).",
        valueName: "uri")) var nbd: String?
    @Option(name: .customLong("nbd-timeout"), help: ArgumentHelp(
        "With --nbd: give up when the NBD server sends nothing for this many seconds (the handshake, or any request in flight; default \(Int(NBDClient.defaultTimeout))).",
        valueName: "seconds")) var timeout: Double?

    /// --nbd-timeout (a positive number of seconds), or the default.
    func timeoutSeconds(_ uri: String) throws -> Double {
        guard let t = timeout else { return NBDClient.defaultTimeout }
        guard t.isFinite, t > 0 else { throw CommandFailure(message: "\(uri): --nbd-timeout takes a positive number of seconds") }
        return t
    }
}
