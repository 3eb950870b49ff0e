import ArgumentParser
import QCow2

/// `qimg bitmap`: qemu-img's actions (in command-line order, all-or-nothing) and `--dump`.
struct Bitmap: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bitmap",
        abstract: "Manage persistent dirty bitmaps (qemu-img bitmap), or show one (--dump).",
        usage: """
            qimg bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
                        [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT]
                        FILENAME BITMAP
            qimg bitmap --dump [--output=human|json] [-f FMT] [-U] FILENAME BITMAP
            """,
        discussion: """
            Actions run in the order given; if any fails, the image is left unchanged.

              --add                 create BITMAP (disabled if --disable follows)
              --remove              delete BITMAP
              --clear               mark every cluster of BITMAP clean
              --enable, --disable   start or stop recording writes in BITMAP
              --merge SOURCE        add bitmap SOURCE (of FILENAME or SOURCE_FILE)
              -b, --source-file SOURCE_FILE   the image with the --merge source
              -F, --source-format SOURCE_FMT  its format; probed when omitted
              -g, --granularity GRANULARITY   bytes per bit for --add (2^n, >= 512)
              -f FMT                the format of FILENAME; probed when omitted
              -q                    accepted (bitmap prints nothing anyway)
              --dump                show where BITMAP is dirty (map and extents)
              --output human|json   the format of --dump's output
              -U, --force-share     --dump without taking locks

            \(ExitStatus.plain)
            """)

    @Argument(parsing: .allUnrecognized, help: "Actions, options, FILENAME and BITMAP (see above).") var arguments: [String] = []

    struct Parsed {
        var actions: [BitmapAction] = []
        var sourceFile: String?
        var sourceFormat: String?
        var granularity: UInt64?
        var format: String?
        var dump = false
        var json = false
        var forceShare = false
        var positional: [String] = []
    }

    func parse() throws -> Parsed {
        var p = Parsed()
        var i = 0
        func value(_ flag: String) throws -> String {
            if let eq = arguments[i].firstIndex(of: "="), arguments[i].hasPrefix("--") {
                return String(arguments[i][arguments[i].index(after: eq)...])
            }
            guard i + 1 < arguments.count else { throw CommandFailure(message: "option \(flag) needs a value") }
            i += 1
            return arguments[i]
        }
        var onlyPositional = false
        while i < arguments.count {
            let a = arguments[i]
            if onlyPositional || !a.hasPrefix("-") || a == "-" {
                p.positional.append(a)
                i += 1
                continue
            }
            let key = a.split(separator: "=", maxSplits: 1).first.map(String.init) ?? a
            switch key {
            case "--": onlyPositional = true
            case "--add": p.actions.append(.add(granularity: nil, disabled: false))
            case "--remove": p.actions.append(.remove)
            case "--clear": p.actions.append(.clear)
            case "--enable": p.actions.append(.enable)
            case "--disable":
                // Right after --add, qemu-img creates the bitmap disabled.
                if case .add(let g, false)? = p.actions.last { p.actions[p.actions.count - 1] = .add(granularity: g, disabled: true) } else { p.actions.append(.disable) }
            case "--merge": p.actions.append(.merge(source: try value(key)))
            case "-b", "--source-file": p.sourceFile = try value(key)
            case "-F", "--source-format": p.sourceFormat = try value(key)
            case "-g", "--granularity":
                let v = try value(key)
                guard let g = SizeArgument.parse(v) else { throw CommandFailure(message: "Invalid granularity specified: \(v)") }
                p.granularity = g
            case "-f": p.format = try value(key)
            case "--dump": p.dump = true
            case "--output":
                let v = try value(key)
                guard v == "json" || v == "human" else { throw CommandFailure(message: "--output must be human or json") }
                p.json = v == "json"
            case "-U", "--force-share": p.forceShare = true
            case "-q": break
            default: throw CommandFailure(message: "unknown option '\(a)'")
            }
            i += 1
        }
        if let g = p.granularity {
            p.actions = p.actions.map { if case .add(_, let d) = $0 { return .add(granularity: g, disabled: d) } else { return $0 } }
        }
        return p
    }

    func run() throws {
        let p = try parse()
        guard p.positional.count == 2 else {
            throw CommandFailure(message: "Expecting filename and bitmap name")
        }
        let (file, name) = (p.positional[0], p.positional[1])
        let fmt = try p.format.map { try ImageFormat(name: $0, path: file) }
        if p.dump {
            guard p.actions.isEmpty else { throw CommandFailure(message: "--dump cannot be combined with other actions") }
            var opener = ImageOpener()
            opener.openBacking = false
            opener.forceShare = p.forceShare
            guard let image = try opener.open(file, format: fmt) as? QCow2Image else {
                throw CommandFailure(message: "\(file): only qcow2 images have persistent bitmaps")
            }
            let (entry, bitmap) = try image.consistentBitmap(name)
            Output.out(p.json ? BitmapDump.json(entry, bitmap) : BitmapDump.human(entry, bitmap, diskSize: image.virtualSize))
            return
        }
        guard !p.actions.isEmpty else {
            throw CommandFailure(message: "Need at least one of --add, --remove, --clear, --enable, --disable, --merge or --dump")
        }
        if p.sourceFile != nil && !p.actions.contains(where: { if case .merge = $0 { return true } else { return false } }) {
            throw CommandFailure(message: "-b only makes sense with --merge")
        }
        // The merge source image is opened (and its bitmaps read) before anything changes.
        var source: QCow2Image?
        if let sf = p.sourceFile {
            var opener = ImageOpener()
            opener.openBacking = false
            guard let s = try opener.open(sf, format: try p.sourceFormat.map { try ImageFormat(name: $0, path: sf) }) as? QCow2Image else {
                throw CommandFailure(message: "\(sf): only qcow2 images have persistent bitmaps")
            }
            source = s
        }
        var opener = ImageOpener()
        opener.writable = true
        opener.openBacking = false
        guard let image = try opener.open(file, format: fmt) as? QCow2Image else {
            throw CommandFailure(message: "\(file): only qcow2 images have persistent bitmaps")
        }
        do {
            try image.applyBitmapActions(p.actions, to: name, mergeSource: source.map { s in
                { try s.consistentBitmap($0).1 } })
        } catch let e as QCow2Error where { if case .bitmapOperation = e { return true } else { return false } }() {
            throw CommandFailure(message: ErrorText.line(e))
        } catch let e as QCow2Error {
            throw CommandFailure(message: "\(file): Operation on bitmap \(name) failed: \(e.message)")
        }
    }
}

enum BitmapDump {
    static func flags(_ e: BitmapDirectoryEntry) -> [String] {
        (e.inUse ? ["in-use"] : []) + (e.isAuto ? ["auto"] : [])
    }

    static func json(_ e: BitmapDirectoryEntry, _ b: DirtyBitmap) -> String {
        var out = "{\n"
        out += "    \"name\": \(QemuJSON.quote(e.name)),\n"
        out += "    \"granularity\": \(e.granularity),\n"
        out += "    \"flags\": [" + flags(e).map { QemuJSON.quote($0) }.joined(separator: ", ") + "],\n"
        out += "    \"dirty-bytes\": \(b.dirtyBytes),\n"
        var extents: [String] = []
        b.forEachDirtyExtent { extents.append("{ \"start\": \($0), \"length\": \($1) }") }
        out += "    \"extents\": [" + (extents.isEmpty ? "" : "\n        " + extents.joined(separator: ",\n        ") + "\n    ") + "]\n"
        return out + "}\n"
    }

    static func human(_ e: BitmapDirectoryEntry, _ b: DirtyBitmap, diskSize: UInt64) -> String {
        var extents: [(UInt64, UInt64)] = []
        b.forEachDirtyExtent { extents.append(($0, $1)) }
        let dirty = extents.reduce(0) { $0 + $1.1 }
        var s = "bitmap: \(e.name)\n"
        s += "granularity: \(e.granularity)\n"
        s += "flags: " + (flags(e).isEmpty ? "(disabled)" : flags(e).joined(separator: ", ")) + "\n"
        s += "dirty: \(dirty) bytes (\(Human.size(dirty))) in \(extents.count) extent\(extents.count == 1 ? "" : "s")\n"
        // One character per 1/64 of the disk: '#' where any byte is dirty.
        let columns: UInt64 = 64
        var picture = [Character](repeating: ".", count: Int(columns))
        if diskSize > 0 {
            // offset * 64 / diskSize in 128 bits: offsets past 2^58 would overflow 64.
            func column(_ offset: UInt64) -> Int {
                Int(min(columns - 1, diskSize.dividingFullWidth(min(offset, diskSize - 1).multipliedFullWidth(by: columns)).quotient))
            }
            for (start, length) in extents where length > 0 {
                for c in column(start)...column(start + (length - 1)) { picture[c] = "#" }
            }
        }
        let columnBytes = diskSize / columns + (diskSize % columns == 0 ? 0 : 1)
        s += "map: |" + String(picture) + "| (each column \(Human.size(columnBytes)))\n"
        if !extents.isEmpty {
            s += "Offset          Length\n"
            // Offsets of 16 hex digits or more (past 2^56) still get a space before the length.
            for (start, length) in extents { s += Human.pad(Human.hexColumn(start), 15) + " " + Human.hexColumn(length).trimmingTrailingSpaces() + "\n" }
        }
        return s
    }
}

extension String {
    func trimmingTrailingSpaces() -> String {
        var s = self
        while s.last == " " { s.removeLast() }
        return s
    }
}
