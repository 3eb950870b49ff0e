import ArgumentParser
import QCow2

struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check an image for consistency (qemu-img check).",
        discussion: """
            Exit status (qemu-img's): 0 no errors, 1 the check could not be completed (internal \
            errors, an image that cannot be opened, a usage error), 2 corruptions found, 3 only \
            leaked clusters found, 63 the image format (raw) does not support checks. With -r, \
            2 and 3 describe the image after the repair.
            """)
    @OptionGroup var format: FormatOption
    @OptionGroup var share: ShareOption
    @OptionGroup var imageOpts: ImageOptsOption
    @Option(help: ArgumentHelp("Output format: human or json.", valueName: "ofmt")) var output: OutputFormat = .human
    @Flag(name: .customShort("q"), help: "Quiet: print nothing on standard output.") var quiet = false
    @Option(name: .customShort("r"), help: ArgumentHelp("Repair: leaks, or all (leaks and refcount/COPIED errors).", valueName: "mode")) var repair: RepairMode?

    enum RepairMode: String, ExpressibleByArgument { case leaks, all }
    @Argument(help: "The image file.") var file: String

    func run() throws {
        var opener = ImageOpener()
        opener.writable = repair != nil
        opener.forceShare = share.forceShare
        opener.repairDirty = false
        opener.allowCorrupt = repair != nil
        opener.tolerateBrokenBitmaps = true
        let (path, fmt) = try imageOpts.locate(file, format: format)
        let image = try opener.open(path, format: fmt)
        guard let q = image as? QCow2Image else {
            throw CommandFailure(message: "\(file): This image format does not support checks", exitCode: 63)
        }
        let r: CheckResult
        let lines = ReportLines()
        defer { lines.flush() }
        if let repair {
            r = try CheckOperation.repair(q, mode: repair == .all ? .all : .leaks) { lines.add($0) }
            lines.flush()
            if repair == .all && r.corruptions == 0 && r.checkErrors == 0 { try q.clearDirtyBit() }
        } else {
            r = try CheckOperation.run(q) { lines.add($0) }
        }
        if !r.inconsistentBitmaps.isEmpty {
            lines.add("Hint: remove inconsistent bitmaps with 'qimg bitmap --remove' or 'qimg check -r all'")
        }
        lines.flush()
        if !quiet {
            var text = ""
            if output == .human && (r.leaksFixed > 0 || r.corruptionsFixed > 0) {
                text += "The following inconsistencies were found and repaired:\n\n"
                text += "    \(r.leaksFixed) leaked clusters\n    \(r.corruptionsFixed) corruptions\n\n"
                text += "Double checking the fixed image now...\n"
            }
            text += output == .json ? CheckFormatter.json(r, file: file) : CheckFormatter.human(r)
            Output.out(text)
        }
        throw ExitCode(r.exitCode)
    }
}

enum CheckFormatter {
    static func json(_ r: CheckResult, file: String) -> String {
        var p: [(String, JSONValue)] = [("filename", .string(file)), ("format", .string("qcow2")),
                                        ("check-errors", .int(Int64(r.checkErrors)))]
        func opt(_ k: String, _ v: UInt64) { if v != 0 { p.append((k, .uint(v))) } }
        opt("image-end-offset", r.imageEndOffset)
        opt("corruptions", UInt64(r.corruptions))
        opt("leaks", UInt64(r.leaks))
        opt("corruptions-fixed", UInt64(r.corruptionsFixed))
        opt("leaks-fixed", UInt64(r.leaksFixed))
        opt("total-clusters", r.totalClusters)
        opt("allocated-clusters", r.allocatedClusters)
        opt("fragmented-clusters", r.fragmentedClusters)
        opt("compressed-clusters", r.compressedClusters)
        return QemuJSON.render(.object(p)) + "\n"
    }

    static func human(_ r: CheckResult) -> String {
        var s = ""
        if r.corruptions == 0 && r.leaks == 0 && r.checkErrors == 0 {
            s += "No errors were found on the image.\n"
        } else {
            if r.corruptions > 0 {
                s += "\n\(r.corruptions) errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
            }
            if r.leaks > 0 {
                s += "\n\(r.leaks) leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
            }
            if r.checkErrors > 0 {
                s += "\n\(r.checkErrors) internal errors have occurred during the check.\n"
            }
        }
        if r.totalClusters != 0 && r.allocatedClusters != 0 {
            let a = Double(r.allocatedClusters)
            s += "\(r.allocatedClusters)/\(r.totalClusters) = "
                + Human.format("%0.2f", a / Double(r.totalClusters) * 100) + "% allocated, "
                + Human.format("%0.2f", Double(r.fragmentedClusters) / a * 100) + "% fragmented, "
                + Human.format("%0.2f", Double(r.compressedClusters) / a * 100) + "% compressed clusters\n"
        }
        if r.imageEndOffset != 0 { s += "Image end offset: \(r.imageEndOffset)\n" }
        return s
    }
}
