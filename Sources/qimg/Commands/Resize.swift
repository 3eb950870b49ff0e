import ArgumentParser
import QCow2

struct Resize: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resize",
        abstract: "Change the virtual size of an image (qemu-img resize).",
        discussion: "SIZE is absolute, or relative with + or -; it is always the last argument (a negative size needs no --).\n\n" + ExitStatus.plain)

    @OptionGroup var format: FormatOption
    @Flag(name: .customLong("shrink"), help: "Allow shrinking (needed for any shrink, as in qemu-img).") var shrink = false
    @Option(name: .customLong("preallocation"), help: ArgumentHelp("Preallocation of the new area: off, metadata, falloc, full.", valueName: "prealloc")) var preallocation: String?
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Argument(help: "The image file.") var file: String
    @Argument(help: "New size: [+|-]SIZE.") var size: String

    /// qemu-img takes the last argument as the size whatever it looks like, so that
    /// `resize IMG -7M` works without `--`: a `--` goes in front of it here.
    static func sizeLast(_ args: [String]) -> [String] {
        guard args.count >= 3, let last = args.last, last.hasPrefix("-"), last != "--",
              args[args.count - 2] != "--" else { return args }
        return args.dropLast() + ["--", last]
    }

    func run() throws {
        var text = Substring(size)
        var sign = 0
        if text.hasPrefix("+") { sign = 1; text = text.dropFirst() } else if text.hasPrefix("-") { sign = -1; text = text.dropFirst() }
        let amount = try OptionList.size("size", String(text))
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
        if prealloc != .off && target <= current {
            throw CommandFailure(message: "Preallocation can only be used for growing images")
        }
        // qemu-img wants --shrink for any shrink, whatever the part cut off holds.
        if target < current && !shrink {
            Output.error("qimg: Use the --shrink option to perform a shrink operation.")
            Output.error("qimg: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.")
            throw ExitCode(1)
        }
        if let q = image as? QCow2Image {
            try q.resize(to: target, allowShrink: shrink, preallocation: prealloc)
            try q.flush()
        } else if let r = image as? RawImage {
            if prealloc == .metadata { throw CommandFailure(message: "\(file): Unsupported preallocation mode: metadata") }
            try r.file.truncate(to: target)
            if prealloc == .falloc { _ = r.file.preallocate(at: current, length: target - current) }
            if prealloc == .full { try ImageCreator.writeZeros(r.file, at: current, length: target - current) }
            try r.file.fullSync()
        }
        if !quiet { Output.out("Image resized.\n") }
    }
}
