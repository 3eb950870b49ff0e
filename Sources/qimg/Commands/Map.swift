import ArgumentParser
import QCow2

struct Map: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "map",
        abstract: "Show the allocation map of an image (qemu-img map).",
        discussion: ExitStatus.plain)

    @OptionGroup var format: FormatOption
    @OptionGroup var share: ShareOption
    @OptionGroup var imageOpts: ImageOptsOption
    @Option(help: ArgumentHelp("Output format: human or json.", valueName: "ofmt")) var output: OutputFormat = .human
    @Option(name: .customLong("start-offset"), help: ArgumentHelp("First guest byte to map.", valueName: "offset")) var startOffset: SizeArgument?
    @Option(name: .customLong("max-length"), help: ArgumentHelp("Number of guest bytes to map.", valueName: "len")) var maxLength: SizeArgument?
    @Argument(help: "The image file.") var file: String

    func run() throws {
        let image = try openImage(file, format: format, share: share, imageOpts: imageOpts)
        var first = true
        var text = ""
        if output == .human {
            text = "Offset          Length          Mapped to       File\n"
        }
        try MapOperation.run(image, start: startOffset?.value ?? 0, maxLength: maxLength?.value) { e in
            switch output {
            case .json:
                text += first ? "[" : ",\n"
                text += "{ \"start\": \(e.start), \"length\": \(e.length), \"depth\": \(e.depth),"
                text += " \"present\": \(e.present), \"zero\": \(e.zero), \"data\": \(e.data)"
                if let o = e.offset { text += ", \"offset\": \(o)" }
                text += "}"
            case .human:
                if e.data && e.offset == nil {
                    Output.out(text)
                    text = ""
                    throw CommandFailure(message: "\(file): File contains external, encrypted or compressed clusters.")
                }
                if e.data && !e.zero, let o = e.offset {
                    text += Human.hexColumn(e.start) + Human.hexColumn(e.length) + Human.hexColumn(o) + (e.filename ?? "") + "\n"
                }
            }
            first = false
            if text.utf8.count > 1 << 16 {
                Output.out(text)
                text = ""
            }
        }
        if output == .json { text += first ? "[]\n" : "]\n" }
        Output.out(text)
    }
}
