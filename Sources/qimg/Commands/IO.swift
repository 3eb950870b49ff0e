import ArgumentParser
import QCow2

struct IO: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "io",
        abstract: "Run qemu-io style commands on an image.",
        discussion: """
            Commands (qemu-io syntax):
              read [-P PATTERN] OFFSET LENGTH
              write [-P PATTERN] [-z [-u]] [-c] OFFSET LENGTH   (-c: compressed, whole clusters)
              discard OFFSET LENGTH
              flush
            The image is opened read-write only when a command changes it (or never, with -r).

            Exit status: 0 every command succeeded, 1 a command failed (a pattern mismatch \
            included) or any other error.
            """)

    @OptionGroup var format: FormatOption
    @OptionGroup var share: ShareOption
    @Flag(name: [.customShort("r"), .customLong("read-only")], help: "Open the image read-only.") var readOnly = false
    @Option(name: .customShort("c"), help: ArgumentHelp("A command to run (repeatable).", valueName: "command")) var commands: [String] = []
    @Argument(help: "The image file.") var file: String

    func run() throws {
        let parsed = try commands.map(parse)
        let writes = parsed.contains { $0.modifies }
        if writes && readOnly {
            throw CommandFailure(message: "\(file): the image is opened read-only (-r) but a command writes to it")
        }
        var opener = ImageOpener()
        opener.writable = writes
        opener.forceShare = share.forceShare
        let image = try opener.open(file, format: try format.imageFormat(path: file))
        // A failed command still ends the session cleanly: every write so far is
        // complete and recorded in the tracked bitmaps, which are written back.
        var failure: Error?
        for c in parsed {
            do { try execute(c, on: image) } catch { failure = error; break }
        }
        if writes {
            do {
                if let q = image as? QCow2Image { try q.close() } else { try sync(image) }
            } catch { if failure == nil { failure = error } }
        }
        if let failure { throw failure }
    }

    enum Verb { case read, write, discard, flush }

    struct Command {
        var verb: Verb
        var pattern: UInt8?
        var zero = false
        var unmap = false
        var compressed = false
        var offset: UInt64 = 0
        var length: UInt64 = 0
        var modifies: Bool { verb == .write || verb == .discard }
    }

    func parse(_ text: String) throws -> Command {
        let words = text.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
        guard let verbWord = words.first else { throw CommandFailure(message: "\(file): empty io command") }
        let verb: Verb
        switch verbWord {
        case "read": verb = .read
        case "write": verb = .write
        case "discard": verb = .discard
        case "flush": verb = .flush
        default: throw CommandFailure(message: "\(file): unknown io command '\(verbWord)'")
        }
        var c = Command(verb: verb)
        if verb == .flush {
            guard words.count == 1 else { throw CommandFailure(message: "\(file): usage: flush") }
            return c
        }
        var rest: [String] = []
        var i = 1
        while i < words.count {
            switch words[i] {
            case "-P" where verb != .discard:
                guard i + 1 < words.count, let p = parsePattern(words[i + 1]) else {
                    throw CommandFailure(message: "\(file): \(verbWord): -P needs a byte pattern (0..255)")
                }
                c.pattern = p
                i += 2
            case "-z" where verb == .write: c.zero = true; i += 1
            case "-u" where verb == .write: c.unmap = true; i += 1
            case "-c" where verb == .write: c.compressed = true; i += 1
            case "-q", "-v": i += 1
            default:
                if words[i].hasPrefix("-") && SizeArgument.parse(words[i]) == nil {
                    throw CommandFailure(message: "\(file): \(verbWord): unknown option '\(words[i])'")
                }
                rest.append(words[i])
                i += 1
            }
        }
        let usage = verb == .discard ? "discard OFFSET LENGTH"
            : verb == .write ? "write [-P PATTERN] [-z [-u]] OFFSET LENGTH" : "read [-P PATTERN] OFFSET LENGTH"
        guard rest.count == 2, let off = SizeArgument.parse(rest[0]), let len = SizeArgument.parse(rest[1]) else {
            throw CommandFailure(message: "\(file): usage: \(usage)")
        }
        if c.zero && c.pattern != nil { throw CommandFailure(message: "\(file): write: -z and -P cannot be combined") }
        if c.unmap && !c.zero { throw CommandFailure(message: "\(file): write: -u needs -z") }
        c.offset = off
        c.length = len
        return c
    }

    func execute(_ c: Command, on image: any DiskImage) throws {
        if c.verb == .flush {
            try sync(image)
            return
        }
        guard c.offset <= image.virtualSize, c.length <= image.virtualSize - c.offset else {
            throw CommandFailure(message: "\(file): request at offset \(c.offset), \(c.length) bytes, is outside the image (size \(image.virtualSize))")
        }
        switch c.verb {
        case .read: try read(image, c)
        case .write:
            if c.zero {
                try zero(image, c)
            } else if c.compressed {
                try writeCompressed(image, c)
            } else {
                try write(image, c)
            }
            Output.out("wrote \(c.length)/\(c.length) bytes at offset \(c.offset)\n")
        case .discard:
            if let q = image as? QCow2Image { try q.discard(at: c.offset, length: c.length) }
            Output.out("discard \(c.length)/\(c.length) bytes at offset \(c.offset)\n")
        case .flush: break
        }
    }

    func sync(_ image: any DiskImage) throws {
        if let q = image as? QCow2Image { try q.flush() } else { try image.file.sync() }
    }

    static let chunk: UInt64 = 4 << 20

    func write(_ image: any DiskImage, _ c: Command) throws {
        let buf = [UInt8](repeating: c.pattern ?? 0xcd, count: Int(min(Self.chunk, max(c.length, 1))))
        var done: UInt64 = 0
        while done < c.length {
            let n = Int(min(Self.chunk, c.length - done))
            try buf.withUnsafeBytes { b in
                let part = UnsafeRawBufferPointer(rebasing: b[0..<n])
                if let q = image as? QCow2Image {
                    try q.write(part, at: c.offset + done)
                } else if let r = image as? RawImage {
                    try r.write(part, at: c.offset + done)
                }
            }
            done += UInt64(n)
        }
    }

    func writeCompressed(_ image: any DiskImage, _ c: Command) throws {
        guard let q = image as? QCow2Image else {
            throw CommandFailure(message: "\(file): compressed writes need a qcow2 image")
        }
        let cs = UInt64(q.geometry.clusterSize)
        guard c.offset % cs == 0, c.length % cs == 0 || c.offset + c.length == q.virtualSize else {
            throw CommandFailure(message: "\(file): write -c: offset and length must cover whole clusters (\(cs) bytes)")
        }
        let buf = [UInt8](repeating: c.pattern ?? 0xcd, count: Int(cs))
        var pos = c.offset
        while pos < c.offset + c.length {
            let n = Int(min(cs, c.offset + c.length - pos))
            try buf.withUnsafeBytes { try q.writeCompressed(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: pos) }
            pos += UInt64(n)
        }
    }

    func zero(_ image: any DiskImage, _ c: Command) throws {
        if let q = image as? QCow2Image {
            try q.writeZeroes(at: c.offset, length: c.length, unmap: c.unmap)
        } else {
            try write(image, Command(verb: .write, pattern: 0, offset: c.offset, length: c.length))
        }
    }

    func read(_ image: any DiskImage, _ c: Command) throws {
        let (off, len) = (c.offset, c.length)
        var buf = [UInt8](repeating: 0, count: Int(min(Self.chunk, max(len, 1))))
        var done: UInt64 = 0
        while done < len {
            let n = Int(min(Self.chunk, len - done))
            try buf.withUnsafeMutableBytes { b in
                try image.read(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<n]), at: off + done)
            }
            if let p = c.pattern, let bad = buf[0..<n].firstIndex(where: { $0 != p }) {
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
