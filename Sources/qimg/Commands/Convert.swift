import ArgumentParser
import QCow2

struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "convert",
        abstract: "Copy an image (through its backing chain) into a new one (qemu-img convert).",
        discussion: ExitStatus.interruptible)

    @OptionGroup var format: FormatOption
    @OptionGroup var share: ShareOption
    @OptionGroup var imageOpts: ImageOptsOption
    @Option(name: .customShort("O"), help: ArgumentHelp("Output format: qcow2 or raw.", valueName: "output_fmt")) var outputFormat: String = "raw"
    @Option(name: .customShort("o"), help: ArgumentHelp("Output format options (as for create).", valueName: "options")) var options: [String] = []
    @Flag(name: .customShort("c"), help: "Compress the output clusters (qcow2).") var compress = false
    @OptionGroup var zlib: ZlibOption
    @Option(name: .customShort("B"), help: ArgumentHelp("Backing file of the output image.", valueName: "backing_file")) var backing: String?
    @Option(name: .customShort("F"), help: ArgumentHelp("Format of the -B backing file.", valueName: "backing_fmt")) var backingFormat: String?
    @Flag(name: .customShort("n"), help: "Write into an existing output image (no create).") var noCreate = false
    @Option(name: .customShort("S"), help: ArgumentHelp("Minimum run of zeros kept sparse (default 4k).", valueName: "sparse_size")) var sparse: SizeArgument?
    @Option(name: .customShort("t"), help: ArgumentHelp("Target cache mode (qemu-img's): unsafe skips the final fsync; the others (default writeback) make the target durable before it appears.", valueName: "cache")) var cache: String?
    @Flag(name: .customShort("p"), help: "Show progress.") var showProgress = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Flag(name: .customLong("bitmaps"), help: "Copy the source's persistent bitmaps.") var bitmaps = false
    @Flag(name: .customLong("skip-broken-bitmaps"), help: "With --bitmaps, skip inconsistent bitmaps.") var skipBroken = false
    @Argument(help: "Source image.") var source: String
    @Argument(help: "Output image.") var target: String

    static let qcow2Keys: Set<String> = ["backing_file", "backing_fmt", "cluster_size", "compat", "compression_type", "encryption",
                                         "extended_l2", "lazy_refcounts", "preallocation", "refcount_bits", "size"]

    func run() throws {
        let outFmt: ImageFormat
        do { outFmt = try ImageFormat(name: outputFormat, path: target) } catch {
            throw CommandFailure(message: "Unknown file format '\(outputFormat)'")
        }
        let list = try OptionList(options)
        if noCreate && !options.isEmpty { throw CommandFailure(message: "-o has no effect when skipping image creation") }
        var o = ConvertOptions()
        if let c = cache {
            guard ["none", "writeback", "writethrough", "directsync", "unsafe"].contains(c) else {
                throw CommandFailure(message: "Invalid cache option: \(c)")
            }
            o.durable = c != "unsafe"
        }
        o.create.format = outFmt
        // qemu-img reports these after its option parsing, as errors of the image creation.
        var late: String?
        if outFmt == .qcow2 {
            for (k, _) in list.values where !Self.qcow2Keys.contains(k) {
                throw CommandFailure(message: "Invalid parameter '\(k)'")
            }
            late = try list.applyQCow2Options(to: &o.create)
            if let v = list.value("encryption") {
                _ = try OptionList.bool("encryption", v)
                late = late ?? OptionList.encryptionRefusal(v)
            }
            if let v = list.value("size") { _ = try OptionList.size("size", v) }
        } else if let k = list.values.first(where: { $0.key != "preallocation" })?.key {
            throw CommandFailure(message: "Invalid parameter '\(k)'")
        }
        if let v = list.value("preallocation") {
            if let p = CreateOptions.Preallocation(rawValue: v) { o.create.preallocation = p } else {
                late = late ?? (outFmt == .qcow2 ? "Parameter 'preallocation' does not accept value '\(v)'" : "invalid parameter value: \(v)")
            }
        }
        if compress && outFmt != .qcow2 { throw CommandFailure(message: "Compression not supported for this file format") }
        o.compressed = compress
        o.zlibEncoder = try zlib.resolved(compress: compress, file: target)
        o.skipCreate = noCreate
        o.minSparse = sparse?.value ?? 4096
        o.copyBitmaps = bitmaps
        o.skipBrokenBitmaps = skipBroken
        o.skippedBitmap = { Output.error("qimg: warning: Skipping inconsistent bitmap '\($0)'") }
        // -B and -F win over -o backing_file and backing_fmt.
        let backingName = backing ?? list.value("backing_file")
        let backingFmt = backingFormat ?? list.value("backing_fmt")
        if let b = backingName {
            guard outFmt == .qcow2 else { throw CommandFailure(message: "\(target): Backing file not supported for file format '\(outFmt.rawValue)'") }
            guard let f = backingFmt else { throw CommandFailure(message: "Use of backing file requires explicit backing format") }
            if let fmt = try? ImageFormat(name: f, path: b) {
                o.backingFile = b
                o.backingFormat = fmt
            } else {
                late = late ?? "Parameter 'backing-fmt' does not accept value '\(f)'"
            }
        } else if backingFmt != nil {
            late = late ?? "Backing format cannot be used without backing file"
        }
        if let late { throw CommandFailure(message: "\(target): error while converting \(outFmt.rawValue): \(late)") }
        var opener = ImageOpener()
        opener.forceShare = share.forceShare
        let (sourcePath, sourceFormat) = try imageOpts.locate(source, format: format)
        let src = try opener.open(sourcePath, format: sourceFormat)
        let bar = ProgressReporter(enabled: showProgress && !quiet)
        o.shouldStop = { Interruption.requested }
        Interruption.install()
        do {
            // The copy is never readable by more users than the source.
            try StagedFile.$creationMode.withValue(FileModes.permissions(of: source)) {
                try ConvertOperation.run(source: src, target: target, options: o) { done, total in bar.update(done, total) }
            }
        } catch {
            bar.finish(succeeded: false)
            if Interruption.requested {
                throw Interruption.failure(source, noCreate ? "\(target) was partly written" : "\(target) was not written")
            }
            if case QCow2Error.bitmapInconsistent(let path, let name) = error {
                // qemu-img's words.
                throw CommandFailure(message: "\(path): Cannot copy inconsistent bitmap '\(name)'; try --skip-broken-bitmaps, or use 'qimg bitmap --remove' to delete it")
            }
            throw error
        }
        bar.finish(succeeded: true)
    }
}
