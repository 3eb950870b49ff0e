import ArgumentParser
import QCow2

struct IO: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "io",
        abstract: "Run qemu-io style commands on an image.",
        discussion: "Commands: read [-P PATTERN] OFFSET LENGTH")

    @OptionGroup var format: FormatOption
    @OptionGroup var share: ShareOption
    @Option(name: .customShort("c"), help: "A command to run (repeatable).") var commands: [String] = []
    @Argument(help: "The image file.") var file: String

    func run() throws {
        let image = try openImage(file, format: format)
        for c in commands {
            let words = c.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
            guard let verb = words.first else { continue }
            switch verb {
            case "read":
                try read(image, Array(words.dropFirst()))
            default:
                throw CommandFailure(message: "\(file): unknown io command '\(verb)'")
            }
        }
    }

    func read(_ image: any DiskImage, _ args: [String]) throws {
        var pattern: UInt8?
        var rest: [String] = []
        var i = 0
        while i < args.count {
            if args[i] == "-P" {
                guard i + 1 < args.count, let p = parsePattern(args[i + 1]) else {
                    throw CommandFailure(message: "\(file): read: -P needs a byte pattern (0..255)")
                }
                pattern = p
                i += 2
            } else if args[i] == "-q" || args[i] == "-v" {
                i += 1
            } else {
                rest.append(args[i])
                i += 1
            }
        }
        guard rest.count == 2, let off = SizeArgument.parse(rest[0]), let len = SizeArgument.parse(rest[1]) else {
            throw CommandFailure(message: "\(file): usage: read [-P PATTERN] OFFSET LENGTH")
        }
        guard off <= image.virtualSize, len <= image.virtualSize - off else {
            throw CommandFailure(message: "\(file): read: request at \(off), \(len) bytes, is outside the image (size \(image.virtualSize))")
        }
        let chunk: UInt64 = 4 << 20
        var buf = [UInt8](repeating: 0, count: Int(min(chunk, max(len, 1))))
        var done: UInt64 = 0
        while done < len {
            let n = Int(min(chunk, len - done))
            try buf.withUnsafeMutableBytes { b in
                try image.read(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<n]), at: off + done)
            }
            if let p = pattern, let bad = buf[0..<n].firstIndex(where: { $0 != p }) {
                throw CommandFailure(message: "\(file): Pattern verification failed at offset \(off + done + UInt64(bad)), \(len) bytes")
            }
            done += UInt64(n)
        }
        Output.out("read \(len)/\(len) bytes at offset \(off)\n")
    }

    func parsePattern(_ s: String) -> UInt8? {
        if s.hasPrefix("0x") || s.hasPrefix("0X") { return UInt8(s.dropFirst(2), radix: 16) }
        return UInt8(s)
    }
}
