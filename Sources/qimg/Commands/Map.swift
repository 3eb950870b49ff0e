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
        let start = startOffset?.value ?? 0
        switch output {
        case .json: try printJSON(image, start: start)
        case .human: try printHuman(image, start: start)
        }
    }

    /// qemu-img's JSON list, one entry a line.
    private func printJSON(_ image: any DiskImage, start: UInt64) throws {
        var out = OutputBuffer()
        var first = true
        try MapOperation.run(image, start: start, maxLength: maxLength?.value) { e in
            out.append(first ? "[" : ",\n")
            out.append("{ \"start\": "); out.append(e.start)
            out.append(", \"length\": "); out.append(e.length)
            out.append(", \"depth\": "); out.append(e.depth)
            out.append(", \"present\": "); out.append(e.present)
            out.append(", \"zero\": "); out.append(e.zero)
            out.append(", \"data\": "); out.append(e.data)
            if let o = e.offset { out.append(", \"offset\": "); out.append(o) }
            out.append("}")
            first = false
            out.flush()
        }
        out.append(first ? "[]\n" : "]\n")
        out.flush(force: true)
    }

    /// qemu-img's table of the data mapped in place (with file names: any bytes).
    private func printHuman(_ image: any DiskImage, start: UInt64) throws {
        var text = "Offset          Length          Mapped to       File\n"
        try MapOperation.run(image, start: start, maxLength: maxLength?.value) { e in
            if e.data && e.offset == nil {
                Output.out(text)
                throw CommandFailure(message: "\(file): File contains external, encrypted or compressed clusters.")
            }
            if e.data && !e.zero, let o = e.offset {
                text += Human.hexColumn(e.start) + Human.hexColumn(e.length) + Human.hexColumn(o) + (e.filename ?? "") + "\n"
            }
            if text.utf8.count > 1 << 16 {
                Output.out(text)
                text = ""
            }
        }
        Output.out(text)
    }
}
