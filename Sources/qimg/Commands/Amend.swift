import ArgumentParser
import QCow2

struct Amend: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "amend",
        abstract: "Change image options in place (qemu-img amend).",
        discussion: "Supported: compat=0.10|v2|1.1|v3, lazy_refcounts=on|off, refcount_bits=1|2|4|...|64, size=SIZE.\n\n" + ExitStatus.plain)

    @OptionGroup var format: FormatOption
    @Option(name: .customShort("o"), help: ArgumentHelp("Options to change, key=value[,...].", valueName: "options")) var options: [String] = []
    @Flag(name: .customShort("p"), help: "Show progress (accepted; amend is quick).") var progress = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Argument(help: "The image file.") var file: String

    static let help = """
        Amend options for 'qcow2':
          compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
          lazy_refcounts=<bool (on/off)> - Postpone refcount updates
          refcount_bits=<num>    - Width of a reference count entry in bits
          size=<size>            - Virtual disk size

        """

    func run() throws {
        guard !options.isEmpty else { throw CommandFailure(message: "Must specify options (-o)") }
        let list = try OptionList(options)
        if list.help { Output.out(Self.help); return }
        let createOnly: Set<String> = ["cluster_size", "extended_l2", "compression_type", "preallocation"]
        var version: UInt32?
        var lazy: Bool?
        var size: UInt64?
        var refcountBits: Int?
        for (k, v) in list.values {
            switch k {
            case "compat":
                switch v {
                case "0.10", "v2": version = 2
                case "1.1", "v3": version = 3
                default: throw CommandFailure(message: "Unknown compatibility level \(v)")
                }
            case "lazy_refcounts": lazy = try OptionList.bool(k, v)
            case "size": size = try OptionList.size(k, v)
            case "refcount_bits": refcountBits = try OptionList.number(k, v)
            case "backing_file", "backing_fmt": throw CommandFailure(message: "Cannot amend the backing file; use 'qimg rebase' instead")
            default:
                if createOnly.contains(k) { throw CommandFailure(message: "Invalid parameter '\(k)': this option is only supported for image creation") }
                throw CommandFailure(message: "Invalid parameter '\(k)'")
            }
        }
        var opener = ImageOpener()
        opener.writable = true
        opener.openBacking = false
        let image = try opener.open(file, format: try format.imageFormat(path: file))
        guard var q = image as? QCow2Image else {
            throw CommandFailure(message: "Format driver 'raw' does not support option amendment")
        }
        let current = q.header.version
        if let b = refcountBits, let refusal = QCow2Image.refcountWidthRefusal(b, version: version ?? current, path: file) {
            throw CommandFailure(message: refusal.message)
        }
        if lazy == true && (version ?? current) < 3 {
            throw CommandFailure(message: "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
        }
        // qemu-img's order: upgrade, refcount width, lazy refcounts, size, downgrade last (a snapshot must
        // then have the new size). All of it is checked before the first write: a refused
        // amend leaves the image as it was.
        do {
            if let s = size, let refusal = try q.resizeRefusal(to: s, allowShrink: true, version: max(current, version ?? current)) {
                throw refusal
            }
            if version == 2 && current > 2,
               let refusal = try q.downgradeRefusal(finalSize: size ?? q.virtualSize, refcountBits: refcountBits) { throw refusal }
            if let b = refcountBits { try q.checkRefcountWidthChange(bits: b, version: max(current, version ?? current)) }
            if let v = version, v > current { try q.setVersion(v) }
            if let b = refcountBits { q = try q.changeRefcountWidth(bits: b) }
            if let l = lazy, version != 2 { try q.setLazyRefcounts(l) }
            if let s = size { try q.resize(to: s, allowShrink: true) }
            if version == 2 { try q.setVersion(2) }
        } catch let e as QCow2Error where e.path == file {
            // qemu-img names no file in these messages.
            throw CommandFailure(message: e.message)
        }
        try q.flush()
    }
}
