import ArgumentParser

/// `backup --nbd URI`: the pull mode's option (Commands/NBDBackup.swift runs it).
struct NBDOptions: ParsableArguments {
    @Option(name: .customLong("nbd"), help: ArgumentHelp(
        "Pull mode: back up this NBD export (nbd+unix:///EXPORT?socket=PATH, nbd://HOST:PORT/EXPORT); the only argument is TARGET. With --qmp and --node: where QEMU serves NBD (qimg sets the export up).",
        valueName: "uri")) var nbd: String?
}
