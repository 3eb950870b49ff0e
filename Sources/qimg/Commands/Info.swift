import ArgumentParser
import QCow2

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Show information about an image (qemu-img info).",
        discussion: ExitStatus.plain)

    @OptionGroup var format: FormatOption
    @OptionGroup var share: ShareOption
    @OptionGroup var imageOpts: ImageOptsOption
    @Option(help: ArgumentHelp("Output format: human or json.", valueName: "ofmt")) var output: OutputFormat = .human
    @Flag(name: .customLong("backing-chain"), help: "Show every image of the backing chain.") var backingChain = false
    @Argument(help: "The image file.") var file: String

    func run() throws {
        var infos: [ImageInfo] = []
        let top = try openImage(file, format: format, share: share, imageOpts: imageOpts, backing: backingChain, dataFiles: false)
        var layer: (any DiskImage)? = top
        while let l = layer {
            infos.append(try ImageInfo(l))
            layer = backingChain ? l.backing : nil
        }
        switch output {
        case .json:
            if backingChain {
                Output.out(QemuJSON.render(.array(infos.map(InfoFormatter.json))) + "\n")
            } else {
                Output.out(QemuJSON.render(InfoFormatter.json(infos[0])) + "\n")
            }
        case .human:
            Output.out(infos.map(InfoFormatter.human).joined(separator: "\n"))
        }
    }
}

enum InfoFormatter {
    static func json(_ i: ImageInfo) -> JSONValue {
        var p: [(String, JSONValue)] = [
            ("filename", .string(i.filename)),
            ("format", .string(i.format)),
            ("dirty-flag", .bool(i.dirtyFlag)),
        ]
        if let a = i.actualSize { p.append(("actual-size", .uint(a))) }
        p.append(("virtual-size", .uint(i.virtualSize)))
        if let c = i.clusterSize { p.append(("cluster-size", .int(Int64(c)))) }
        if let b = i.backingFilename { p.append(("backing-filename", .string(b))) }
        if let b = i.fullBackingFilename { p.append(("full-backing-filename", .string(b))) }
        if let b = i.backingFilenameFormat { p.append(("backing-filename-format", .string(b))) }
        if !i.snapshots.isEmpty {
            p.append(("snapshots", .array(i.snapshots.map { s in
                var o: [(String, JSONValue)] = [
                    ("id", .string(s.id)), ("name", .string(s.name)), ("vm-state-size", .uint(s.vmStateSize)),
                    ("date-sec", .int(Int64(s.dateSeconds))), ("date-nsec", .int(Int64(s.dateNanoseconds))),
                    ("vm-clock-sec", .int(Int64(s.vmClockNanoseconds / 1_000_000_000))),
                    ("vm-clock-nsec", .int(Int64(s.vmClockNanoseconds % 1_000_000_000))),
                ]
                if let ic = s.icount, ic != -1 { o.append(("icount", .int(ic))) }
                return .object(o)
            })))
        }
        if i.encrypted { p.append(("encrypted", .bool(true))) }
        if let q = i.qcow2 {
            p.append(("format-specific", .object([("type", .string("qcow2")), ("data", specific(q))])))
        }
        return .object(p)
    }

    static func specific(_ q: ImageInfo.QCow2Specific) -> JSONValue {
        var d: [(String, JSONValue)] = [("compat", .string(q.compat))]
        if let x = q.extendedL2 { d.append(("extended-l2", .bool(x))) }
        if let l = q.lazyRefcounts { d.append(("lazy-refcounts", .bool(l))) }
        if let c = q.corrupt { d.append(("corrupt", .bool(c))) }
        d.append(("refcount-bits", .int(Int64(q.refcountBits))))
        if let f = q.dataFile { d.append(("data-file", .string(f))) }
        if let r = q.dataFileRaw { d.append(("data-file-raw", .bool(r))) }
        if let e = q.encryptFormat { d.append(("encrypt", EncryptInfo.json(format: e, luks: q.luks))) }
        if let bms = q.bitmaps {
            d.append(("bitmaps", .array(bms.map { b in
                .object([("name", .string(b.name)), ("granularity", .uint(b.granularity)),
                         ("flags", .array(b.flags.map { .string($0) }))])
            })))
        }
        d.append(("compression-type", .string(q.compressionType)))
        return .object(d)
    }

    static func human(_ i: ImageInfo) -> String {
        var s = "image: \(i.filename)\n"
        s += "file format: \(i.format)\n"
        s += "virtual size: \(Human.size(i.virtualSize)) (\(i.virtualSize) bytes)\n"
        s += "disk size: " + (i.actualSize.map(Human.size) ?? "unavailable") + "\n"
        if i.encrypted { s += "encrypted: yes\n" }
        if let c = i.clusterSize { s += "cluster_size: \(c)\n" }
        if i.dirtyFlag { s += "cleanly shut down: no\n" }
        if let b = i.backingFilename {
            s += "backing file: \(b)"
            if let f = i.fullBackingFilename, f != b { s += " (actual path: \(f))" }
            s += "\n"
        }
        if let f = i.backingFilenameFormat { s += "backing file format: \(f)\n" }
        s += SnapshotList.text(i.snapshots)
        if let q = i.qcow2 {
            s += "Format specific information:\n"
            dumpHuman(specific(q), indent: 1, into: &s)
        }
        return s
    }

    /// qemu-img's dump of a QObject tree: "key: value", nested levels indented by 4.
    static func dumpHuman(_ v: JSONValue, indent: Int, into s: inout String) {
        let pad = String(repeating: " ", count: indent * 4)
        func line(_ label: String, _ value: JSONValue) {
            switch value {
            case .object, .array:
                s += pad + label + ":\n"
                dumpHuman(value, indent: indent + 1, into: &s)
            case .string(let t): s += pad + label + ": " + t + "\n"
            case .int(let n): s += pad + label + ": \(n)\n"
            case .uint(let n): s += pad + label + ": \(n)\n"
            case .bool(let b): s += pad + label + ": " + (b ? "true" : "false") + "\n"
            }
        }
        switch v {
        case .object(let pairs):
            for (k, val) in QemuJSON.ordered(pairs) { line(k.replacingDashes(), val) }
        case .array(let items):
            for (n, item) in items.enumerated() { line("[\(n)]", item) }
        default:
            line("", v)
        }
    }
}

extension String {
    func replacingDashes() -> String { String(map { $0 == "-" ? " " : $0 }) }
}
