import ArgumentParser
import QCow2

struct Commit: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "commit",
        abstract: "Write an image's changes into its backing file (qemu-img commit).",
        discussion: """
            Every cluster the image allocates (data and zero clusters) is written into the \
            backing file, which is then made durable; afterwards the image is emptied so that \
            it reads through to the backing file, unless -d or -b is given. -b BASE commits \
            into any image further down the chain (every layer above it is copied).

            \(ExitStatus.plain)
            """)

    @OptionGroup var format: FormatOption
    @Option(name: .customShort("b"), help: ArgumentHelp("The image to commit into (default: the backing file).", valueName: "base")) var base: String?
    @Flag(name: .customShort("d"), help: "Do not empty the image after the commit.") var keep = false
    @Flag(name: .customShort("p"), help: "Show progress.") var showProgress = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Argument(help: "The image file.") var file: String

    func run() throws {
        var o = CommitOptions()
        o.format = try format.imageFormat(path: file)
        o.base = base
        o.keepTop = keep
        let progress = QemuProgress(enabled: showProgress && !quiet, step: 1)
        try CommitOperation.run(file, options: o) { done, total in progress.update(done, total) }
        progress.update(1, 1)
        progress.finish()
        if !quiet { Output.out("Image committed.\n") }
    }
}
