import ArgumentParser
import QCow2

struct Rebase: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rebase",
        abstract: "Change the backing file of an image (qemu-img rebase).",
        discussion: """
            Safe mode (default) first copies into the image every range it does not allocate \
            itself where the old and the new backing files differ, so the guest content does not \
            change. -u (unsafe) only rewrites the header. -b "" removes the backing file. The \
            new name is stored as given; a relative name is relative to the image's directory.

            \(ExitStatus.plain)
            """)

    @OptionGroup var format: FormatOption
    @Option(name: .customShort("b"), help: ArgumentHelp("The new backing file (\"\" for none).", valueName: "backing_file")) var backing: String?
    @Option(name: .customShort("F"), help: ArgumentHelp("Format of the new backing file (qcow2 or raw).", valueName: "backing_fmt")) var backingFormat: String?
    @Flag(name: .customShort("u"), help: "Unsafe: change only the header.") var unsafeMode = false
    @Flag(name: .customShort("p"), help: "Show progress.") var showProgress = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Argument(help: "The image file.") var file: String

    func run() throws {
        guard backing != nil || unsafeMode else {
            throw CommandFailure(message: "Must specify backing file (-b) or use unsafe mode (-u)")
        }
        var o = RebaseOptions()
        o.format = try format.imageFormat(path: file)
        o.backing = backing
        if let f = backingFormat {
            guard let fmt = ImageFormat(rawValue: f) else {
                throw CommandFailure(message: "Invalid format name: '\(f)' (qimg supports qcow2 and raw)")
            }
            o.backingFormat = fmt
        }
        o.unsafeMode = unsafeMode
        let progress = QemuProgress(enabled: showProgress && !quiet, step: 2)
        progress.update(0, 1)
        try RebaseOperation.run(file, options: o) { done, total in progress.update(done, total) }
        progress.update(1, 1)
        progress.finish()
    }
}
