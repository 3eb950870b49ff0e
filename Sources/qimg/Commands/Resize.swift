import ArgumentParser
import QCow2

struct Resize: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resize",
        abstract: "Change the virtual size of an image (qemu-img resize).",
        discussion: "SIZE is absolute, or relative with + or - (use -- before a negative size).\n\n" + ExitStatus.plain)

    @OptionGroup var format: FormatOption
    @Flag(name: .customLong("shrink"), help: "Allow shrinking even when the part cut off holds data.") var shrink = false
    @Option(name: .customLong("preallocation"), help: ArgumentHelp("Preallocation of the new area: off, metadata, falloc, full.", valueName: "prealloc")) var preallocation: String?
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Argument(help: "The image file.") var file: String
    @Argument(help: "New size: [+|-]SIZE.") var size: String

    func run() throws {
        var text = Substring(size)
        var sign = 0
        if text.hasPrefix("+") { sign = 1; text = text.dropFirst() } else if text.hasPrefix("-") { sign = -1; text = text.dropFirst() }
        guard let amount = SizeArgument.parse(String(text)) else {
            throw CommandFailure(message: "Parameter 'size' expects a non-negative number below 2^64")
        }
        var prealloc = CreateOptions.Preallocation.off
        if let p = preallocation {
            guard let m = CreateOptions.Preallocation(rawValue: p) else { throw CommandFailure(message: "Invalid preallocation mode '\(p)'") }
            prealloc = m
        }
        var opener = ImageOpener()
        opener.writable = true
        opener.openBacking = false
        let image = try opener.open(file, format: try format.imageFormat(path: file))
        let current = image.virtualSize
        var target: UInt64
        switch sign {
        case 1:
            let (v, o) = current.addingReportingOverflow(amount)
            guard !o else { throw CommandFailure(message: "New image size must be positive") }
            target = v
        case -1:
            guard amount < current else { throw CommandFailure(message: "New image size must be positive") }
            target = current - amount
        default: target = amount
        }
        guard target > 0, target <= UInt64(Int64.max) else { throw CommandFailure(message: "New image size must be positive") }
        if let q = image as? QCow2Image {
            try q.resize(to: target, allowShrink: shrink, preallocation: prealloc)
            try q.flush()
        } else if let r = image as? RawImage {
            if target < current && !shrink {
                throw CommandFailure(message: "Use the --shrink option to perform a shrink operation.")
            }
            if prealloc == .metadata { throw CommandFailure(message: "\(file): Unsupported preallocation mode: metadata") }
            if prealloc != .off && target <= current {
                throw CommandFailure(message: "Preallocation can only be used for growing images")
            }
            try r.file.truncate(to: target)
            if prealloc == .falloc { _ = r.file.preallocate(at: current, length: target - current) }
            if prealloc == .full { try ImageCreator.writeZeros(r.file, at: current, length: target - current) }
            try r.file.fullSync()
        }
        if !quiet { Output.out("Image resized.\n") }
    }
}
