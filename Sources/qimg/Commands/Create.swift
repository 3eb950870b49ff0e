import ArgumentParser
import QCow2

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create a new disk image (qemu-img create).",
        discussion: "Options for -o: see 'qimg create -f qcow2 -o help'.\n\n" + ExitStatus.plain)

    @Option(name: .customShort("f"), help: ArgumentHelp("Image format: qcow2 or raw.", valueName: "fmt")) var format: String = "raw"
    @Option(name: .customShort("b"), help: ArgumentHelp("Backing file.", valueName: "backing_file")) var backing: String?
    @Option(name: .customShort("F"), help: ArgumentHelp("Backing file format.", valueName: "backing_fmt")) var backingFormat: String?
    @Flag(name: .customShort("u"), help: "Do not open the backing file (its size is then needed).") var unsafe = false
    @Option(name: .customShort("o"), help: ArgumentHelp("Format options, key=value[,key=value...].", valueName: "options")) var options: [String] = []
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Argument(help: "The image file.") var file: String?
    @Argument(help: "The virtual size (k, M, G, T, P, E suffixes).") var size: String?

    static let qcow2Help = """
        Supported qcow2 options:
          backing_file=<str>     - File name of a base image
          backing_fmt=<str>      - Image format of the base image
          cluster_size=<size>    - qcow2 cluster size
          compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
          compression_type=<str> - Compression method used for image cluster compression
          extended_l2=<bool (on/off)> - Extended L2 tables
          lazy_refcounts=<bool (on/off)> - Postpone refcount updates
          preallocation=<str>    - Preallocation mode (allowed values: off, metadata, falloc, full)
          refcount_bits=<num>    - Width of a reference count entry in bits
          size=<size>            - Virtual disk size

        """
    static let rawHelp = """
        Supported raw options:
          preallocation=<str>    - Preallocation mode (allowed values: off, falloc, full)
          size=<size>            - Virtual disk size

        """

    static let qcow2Keys: Set<String> = ["backing_file", "backing_fmt", "cluster_size", "compat", "compression_type",
                                         "encryption", "extended_l2", "lazy_refcounts", "preallocation", "refcount_bits", "size"]
    static let refused: Set<String> = ["data_file", "data_file_raw", "encrypt.format", "encrypt.key-secret",
                                       "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.hash-alg", "encrypt.iter-time",
                                       "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg"]

    func run() throws {
        let fmt: ImageFormat
        do { fmt = try ImageFormat(name: format, path: file ?? "") } catch {
            throw CommandFailure(message: "\(file ?? ""): Unknown file format '\(format)'")
        }
        let list = try OptionList(options)
        if list.help {
            Output.out(fmt == .qcow2 ? Self.qcow2Help : Self.rawHelp)
            return
        }
        guard let file else { throw CommandFailure(message: "Expecting image file name") }
        func fail(_ m: String) -> CommandFailure { CommandFailure(message: "\(file): \(m)") }

        // Parse every option before anything is printed or written.
        let allowed: Set<String> = fmt == .qcow2 ? Self.qcow2Keys : ["size", "preallocation"]
        for (k, _) in list.values where !allowed.contains(k) {
            if Self.refused.contains(k) { throw fail("option '\(k)' is not supported by qimg") }
            throw fail("Invalid parameter '\(k)'")
        }
        var o = CreateOptions()
        o.format = fmt
        // encryption=off is the default; any other valid value fails after the "Formatting" line.
        let encryption = fmt == .qcow2 ? list.value("encryption") : nil
        if let v = encryption {
            do { _ = try OptionList.bool("encryption", v) } catch let e as CommandFailure { throw fail(e.message) }
        }
        var sizeValue = try requestedSize(list, fail: fail)
        let backingName = backing ?? list.value("backing_file")
        let backingFmt = backingFormat ?? list.value("backing_fmt")
        if let b = backingName {
            try setBacking(b, format: backingFmt, of: file, fmt: fmt, into: &o, size: &sizeValue, fail: fail)
        }
        guard let sz = sizeValue else { throw fail("Image creation needs a size parameter") }
        guard sz <= UInt64(Int64.max) else {
            throw CommandFailure(message: "Invalid image size specified. Must be between 0 and 9223372036854775807.")
        }
        o.size = sz

        let late = try lateRefusal(list, fmt: fmt, encryption: encryption, into: &o)
        if !quiet {
            let shown = shownOptions(list, fmt: fmt, o, encryption: encryption, backing: backingName, backingFormat: backingFmt)
            let opts = shown.map { "\($0.0)=" + $0.1.flatMap { $0 == "," ? ",," : String($0) } }.joined(separator: " ")
            Output.out("Formatting '\(file)', fmt=\(fmt.rawValue) \(opts)\n")
        }
        if let late { throw fail(late) }
        do {
            try o.validate(path: file)
        } catch {
            throw fail(error.message)
        }
        try ImageCreator.create(file, options: o)
    }

    /// The size from `-o size=` or the positional argument (given at most once).
    func requestedSize(_ list: OptionList, fail: (String) -> CommandFailure) throws -> UInt64? {
        var sizeValue: UInt64?
        if let s = list.value("size") { sizeValue = try OptionList.size("size", s) }
        if let s = size {
            if sizeValue != nil { throw fail("The image size must be specified only once") }
            guard let v = SizeArgument.parse(s) else {
                throw CommandFailure(message: "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
            }
            sizeValue = v
        }
        return sizeValue
    }

    /// The backing file, checked as qemu-img checks it; unless `-u`, it is opened, and
    /// gives the size when none was given.
    func setBacking(_ b: String, format backingFmt: String?, of file: String, fmt: ImageFormat, into o: inout CreateOptions,
                    size sizeValue: inout UInt64?, fail: (String) -> CommandFailure) throws {
        guard fmt == .qcow2 else { throw fail("Backing file not supported for file format 'raw'") }
        guard !b.isEmpty else { throw fail("Expected backing file name, got empty string") }
        let full = BackingName.fullName(b, relativeTo: file)
        if full == file { throw fail("Error: Trying to create an image with the same filename as the backing file") }
        guard let bf = backingFmt else {
            throw fail("Backing file specified without backing format")
        }
        if !unsafe {
            let bfmt: ImageFormat
            do { bfmt = try ImageFormat(name: bf, path: full) } catch {
                throw fail("Unknown driver '\(bf)'\nCould not open backing image.")
            }
            var opener = ImageOpener()
            opener.openBacking = false
            let img: any DiskImage
            do {
                let loc = try BackingName.locate(b, format: bfmt, relativeTo: file)
                img = try opener.open(loc.path, format: loc.format)
            } catch let e as QCow2Error {
                throw fail("Could not open '\(full)': \(e.message)\nCould not open backing image.")
            }
            if sizeValue == nil { sizeValue = img.virtualSize }
        }
        o.backingFile = b
        o.backingFormat = bf
    }

    /// Applies the format options; returns what qemu-img refuses only after printing its
    /// "Formatting" line.
    func lateRefusal(_ list: OptionList, fmt: ImageFormat, encryption: String?, into o: inout CreateOptions) throws -> String? {
        var late: String?
        if fmt == .qcow2 { late = try list.applyQCow2Options(to: &o) }
        if let v = list.value("preallocation") {
            if let p = CreateOptions.Preallocation(rawValue: v) { o.preallocation = p } else {
                late = late ?? "Parameter 'preallocation' does not accept value '\(v)'"
            }
        }
        if let v = encryption { late = late ?? OptionList.encryptionRefusal(v) }
        return late
    }

    /// The options of qemu-img's "Formatting" line, in its order.
    func shownOptions(_ list: OptionList, fmt: ImageFormat, _ o: CreateOptions, encryption: String?,
                      backing backingName: String?, backingFormat backingFmt: String?) -> [(String, String)] {
        var shown: [(String, String)] = []
        if let v = encryption { shown.append(("encryption", v)) }
        guard fmt == .qcow2 else {
            shown.append(("size", String(o.size)))
            if let v = list.value("preallocation") { shown.append(("preallocation", v)) }
            return shown
        }
        shown.append(("cluster_size", String(o.clusterSize)))
        shown.append(("extended_l2", list.value("extended_l2") ?? "off"))
        if let v = list.value("preallocation") { shown.append(("preallocation", v)) }
        shown.append(("compression_type", list.value("compression_type") ?? "zlib"))
        shown.append(("size", String(o.size)))
        if let v = list.value("compat") { shown.append(("compat", v)) }
        if let b = backingName { shown.append(("backing_file", b)) }
        if let f = backingFmt { shown.append(("backing_fmt", f)) }
        shown.append(("lazy_refcounts", list.value("lazy_refcounts") ?? "off"))
        shown.append(("refcount_bits", String(o.refcountBits)))
        return shown
    }
}
