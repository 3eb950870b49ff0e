import ArgumentParser
import QCow2

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Check an image for consistency (qemu-img check).")
    @OptionGroup var format: FormatOption
    @OptionGroup var share: ShareOption
    @Option(help: "Output format: human or json.") var output: OutputFormat = .human
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Argument(help: "The image file.") var file: String

    func run() throws {
        throw CommandFailure(message: "not yet")
    }
}
