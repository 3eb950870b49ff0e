import ArgumentParser
import QCow2

enum OutputFormat: String, ExpressibleByArgument {
    case human, json
}

/// -f FMT: the image format, probed when absent.
struct FormatOption: ParsableArguments {
    @Option(name: .customShort("f"), help: ArgumentHelp("Image format (qcow2 or raw); probed when omitted.", valueName: "fmt"))
    var format: String?

    func imageFormat(path: String) throws -> ImageFormat? {
        guard let format else { return nil }
        return try ImageFormat(name: format, path: path)
    }
}

/// --image-opts: the image argument is a list of QEMU block options instead of a file name,
/// followed for the local-file shapes (`driver=qcow2,file.filename=X`, `driver=file,filename=X`);
/// other drivers and options are refused with one line naming them.
struct ImageOptsOption: ParsableArguments {
    @Flag(name: .customLong("image-opts"), help: "The image argument is QEMU block options (driver=qcow2,file.filename=FILE).")
    var imageOpts = false

    /// The file to open and its format, from `-f` and the image argument.
    func locate(_ image: String, format: FormatOption) throws -> (path: String, format: ImageFormat?) {
        guard imageOpts else { return (image, try format.imageFormat(path: image)) }
        if format.format != nil { throw CommandFailure(message: "--image-opts and --format are mutually exclusive") }
        let loc = try BackingName.locate(imageOptions: try OptionList([image]).values, named: image)
        return (loc.path, loc.format)
    }
}

/// -U / --force-share: open without taking or respecting shared locks.
struct ShareOption: ParsableArguments {
    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open the image read-only without locking.")
    var forceShare = false
}

/// Sizes and offsets in qemu-img's forms: bytes, 0x hex, k/K M G T P E suffixes (powers of 1024).
struct SizeArgument: ExpressibleByArgument {
    var value: UInt64

    init?(argument: String) {
        guard let v = SizeArgument.parse(argument) else { return nil }
        value = v
    }

    static func parse(_ s: String) -> UInt64? {
        var text = Substring(s)
        guard !text.isEmpty else { return nil }
        var shift: UInt64 = 0
        if let last = text.last, last.isLetter {
            switch last {
            case "b", "B": shift = 0
            case "k", "K": shift = 10
            case "m", "M": shift = 20
            case "g", "G": shift = 30
            case "t", "T": shift = 40
            case "p", "P": shift = 50
            case "e", "E": shift = 60
            default: return nil
            }
            text = text.dropLast()
        }
        guard !text.isEmpty else { return nil }
        var base: UInt64
        if text.hasPrefix("0x") || text.hasPrefix("0X") {
            guard shift == 0, let v = UInt64(text.dropFirst(2), radix: 16) else { return nil }
            base = v
            return base
        }
        if let v = UInt64(text) {
            base = v
        } else if let d = Double(text), d >= 0, d.isFinite, text.allSatisfy({ $0.isNumber || $0 == "." }) {
            let r = d * Double(UInt64(1) << shift)
            guard r < 9.2e18 else { return nil }
            return UInt64(r)
        } else {
            return nil
        }
        let (r, o) = base.multipliedReportingOverflow(by: UInt64(1) << shift)
        guard !o, r <= UInt64(Int64.max) else { return nil }
        return r
    }
}

/// Opens an image (and its backing chain) for reading; `-U` takes no locks.
func openImage(_ image: String, format: FormatOption, share: ShareOption, imageOpts: ImageOptsOption? = nil,
               backing: Bool = true, dataFiles: Bool = true) throws -> any DiskImage {
    var opener = ImageOpener()
    opener.openBacking = backing
    opener.openDataFiles = dataFiles
    opener.forceShare = share.forceShare
    // (An ImageOptsOption exists only as a parsed option group: commands without one pass nil.)
    let (path, fmt) = try imageOpts?.locate(image, format: format) ?? (image, try format.imageFormat(path: image))
    return try opener.open(path, format: fmt)
}
