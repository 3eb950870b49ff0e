import ArgumentParser
import QCow2

struct Measure: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "measure",
        abstract: "Calculate the file size a new image needs (qemu-img measure).",
        discussion: """
            Measures an image of --size bytes, or FILENAME (its whole backing chain, as convert \
            copies it) converted to the -O format. Prints the size the new file needs with the data \
            FILENAME holds ("required size") and with every cluster allocated ("fully allocated \
            size"); a qcow2 target measured from a qcow2 v3 source adds its persistent bitmaps \
            ("bitmaps size"). -o takes the -O format's creation options (qcow2: cluster_size, \
            compat, extended_l2, preallocation, refcount_bits, backing_file, ...).
            """ + "\n\n" + ExitStatus.plain)

    @Option(parsing: .unconditional, help: ArgumentHelp("Output format: human or json.", valueName: "ofmt")) var output: String = "human"
    @Option(name: .customShort("O"), parsing: .unconditional, help: ArgumentHelp("Format of the image to measure for: qcow2 or raw.", valueName: "output_fmt"))
    var outputFormat: String = "raw"
    @Option(name: .customShort("o"), parsing: .unconditionalSingleValue, help: ArgumentHelp("Creation options of that format, key=value[,key=value...].", valueName: "options"))
    var options: [String] = []
    @Option(parsing: .unconditional, help: ArgumentHelp("Virtual size of the new image (k, M, G, T, P, E suffixes), instead of FILENAME.", valueName: "size"))
    var size: String?
    @OptionGroup var format: FormatOption
    @Option(name: .customShort("l"), parsing: .unconditional, help: ArgumentHelp("Measure this internal snapshot of FILENAME: an ID or name, or snapshot.id=ID[,snapshot.name=NAME].", valueName: "snapshot_param"))
    var snapshot: String?
    @OptionGroup var share: ShareOption
    @Argument(help: ArgumentHelp("The image to measure (instead of --size).", valueName: "filename")) var files: [String] = []

    /// The -o keys qemu-img takes for each format (its own and the file driver's), by type.
    enum OptionType { case string, bool, size, number }
    static let rawKeys: [String: OptionType] = ["extent_size_hint": .size, "nocow": .bool, "preallocation": .string, "size": .size]
    static let qcow2Keys: [String: OptionType] = rawKeys.merging([
        "backing_file": .string, "backing_fmt": .string, "cluster_size": .size, "compat": .string,
        "compression_type": .string, "data_file": .string, "data_file_raw": .bool, "encrypt.cipher-alg": .string,
        "encrypt.cipher-mode": .string, "encrypt.format": .string, "encrypt.hash-alg": .string,
        "encrypt.iter-time": .number, "encrypt.ivgen-alg": .string, "encrypt.ivgen-hash-alg": .string,
        "encrypt.key-secret": .string, "encryption": .bool, "extended_l2": .bool, "lazy_refcounts": .bool,
        "refcount_bits": .number,
    ]) { a, _ in a }

    func run() throws {
        // What qemu-img checks while reading its options, then the combinations.
        let list = try OptionList(options)
        guard let json = ["human": false, "json": true][output] else {
            throw CommandFailure(message: "--output must be used with human or json as argument.")
        }
        let sizeValue = try size.map(Self.parseSize)
        let selector = try snapshot.map(Self.snapshotSelector)
        if files.count > 1 { throw CommandFailure(message: "At most one filename argument is allowed.") }
        let file = files.first
        if file == nil && (format.format != nil || selector != nil) {
            throw CommandFailure(message: "--image-opts, -f, and -l require a filename argument.")
        }
        if file != nil && sizeValue != nil { throw CommandFailure(message: "--size N cannot be used together with a filename.") }
        if file == nil && sizeValue == nil { throw CommandFailure(message: "Either --size N or one filename must be specified.") }

        let source = try file.map { try openImage($0, format: format, share: share) }
        if let selector, let source {
            do { try SnapshotLoader.load(selector, into: source) } catch let e as QCow2Error {
                throw CommandFailure(message: "Failed to load snapshot: " + e.description)
            }
        }
        guard let target = ImageFormat(rawValue: outputFormat) else {
            let secret = list.items.last { $0.key == "key-secret" }?.value
            throw CommandFailure(message: MeasureOperation.unsupportedFormatMessage(outputFormat, keySecret: secret))
        }
        var o = try Self.measureOptions(list, format: target)
        if let sizeValue { o.size = sizeValue }
        let result = try MeasureOperation.run(source, options: o)

        if json {
            var fields: [(String, JSONValue)] = [("required", .uint(result.required)), ("fully-allocated", .uint(result.fullyAllocated))]
            if let b = result.bitmaps { fields.append(("bitmaps", .uint(b))) }
            Output.out(QemuJSON.render(.object(fields)) + "\n")
        } else {
            var text = "required size: \(result.required)\nfully allocated size: \(result.fullyAllocated)\n"
            if let b = result.bitmaps { text += "bitmaps size: \(b)\n" }
            Output.out(text)
        }
    }

    /// `--size N`, with qemu-img's two messages (a malformed number, or one out of range).
    static func parseSize(_ s: String) throws -> UInt64 {
        if let v = SizeArgument.parse(s) { return v }
        var digits = Substring(s)
        if let last = digits.last, "bBkKmMgGtTpPeE".contains(last) { digits = digits.dropLast() }
        let decimal = !digits.isEmpty && digits.allSatisfy { $0.isASCII && $0.isNumber }
        let hex = s.hasPrefix("0x") && s.count > 2 && s.dropFirst(2).allSatisfy(\.isHexDigit)
        if decimal || hex {
            throw CommandFailure(message: "Invalid image size specified. Must be between 0 and 9223372036854775807.")
        }
        throw CommandFailure(message: "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    }

    /// `-l`: `snapshot.id=ID,snapshot.name=NAME`, or an ID or name.
    static func snapshotSelector(_ param: String) throws -> SnapshotLoader.Selector {
        guard param.hasPrefix("snapshot.") else { return .idOrName(param) }
        let list: OptionList
        // QEMU's parser takes a trailing comma here (unlike -o's lists).
        let items = param.hasSuffix(",") && !param.hasSuffix(",,") ? String(param.dropLast()) : param
        do { list = try OptionList([items]) } catch {
            throw CommandFailure(message: "Failed in parsing snapshot param '\(param)'")
        }
        if let bad = list.items.first(where: { $0.key != "snapshot.id" && $0.key != "snapshot.name" }) {
            throw CommandFailure(message: "Invalid parameter '\(bad.key)'\nFailed in parsing snapshot param '\(param)'")
        }
        return .fields(id: list.value("snapshot.id"), name: list.value("snapshot.name"))
    }

    /// The -o list checked as qemu-img parses it (unknown keys, values of the wrong type, in
    /// order), then turned into the options the measure takes.
    static func measureOptions(_ list: OptionList, format: ImageFormat) throws -> MeasureOptions {
        let keys = format == .qcow2 ? qcow2Keys : rawKeys
        for (k, v) in list.items {
            do {
                switch keys[k] {
                case nil: throw CommandFailure(message: "Invalid parameter '\(k)'")
                case .bool: _ = try OptionList.bool(k, v)
                case .size: _ = try OptionList.size(k, v)
                case .number: _ = try number(k, v)
                case .string: break
                }
            } catch let e as CommandFailure {
                throw CommandFailure(message: e.message + "\nInvalid options for file format '\(format.rawValue)'")
            }
        }
        var o = MeasureOptions()
        o.format = format
        if let v = list.value("size") { o.size = try OptionList.size("size", v) }
        guard format == .qcow2 else { return o }
        if let v = list.value("cluster_size") { o.clusterSize = try OptionList.size("cluster_size", v) }
        if let v = list.value("extended_l2") { o.extendedL2 = try OptionList.bool("extended_l2", v) }
        if let v = list.value("refcount_bits") { o.refcountBits = try number("refcount_bits", v) }
        o.compat = list.value("compat")
        o.preallocation = list.value("preallocation")
        o.backingFile = list.value("backing_file") != nil
        o.encryptFormat = list.value("encrypt.format")
        o.encryptKeySecret = list.value("encrypt.key-secret")
        return o
    }

    /// A number option as QEMU reads it (strtoull, base 0: 0x hex, 0 octal, a minus wraps).
    static func number(_ key: String, _ v: String) throws -> UInt64 {
        var s = Substring(v).drop { " \t\n\r\u{0B}\u{0C}".contains($0) }
        var negative = false
        if let c = s.first, c == "+" || c == "-" { negative = c == "-"; s = s.dropFirst() }
        var radix = 10
        if s.count > 2, s.hasPrefix("0x") || s.hasPrefix("0X"), s.dropFirst(2).first?.isHexDigit == true {
            radix = 16; s = s.dropFirst(2)
        } else if s.count > 1, s.hasPrefix("0") {
            radix = 8; s = s.dropFirst()
        }
        guard !s.isEmpty, s.allSatisfy({ $0.isASCII && $0.hexDigitValue.map { $0 < radix } == true }) else {
            throw CommandFailure(message: "Parameter '\(key)' expects a number")
        }
        guard let n = UInt64(s, radix: radix) else {
            throw CommandFailure(message: "Value '\(v)' is too large for parameter '\(key)'")
        }
        return negative ? 0 &- n : n
    }
}
