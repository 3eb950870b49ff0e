import ArgumentParser
import QCow2

struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "convert",
        abstract: "Copy an image (through its backing chain) into a new one (qemu-img convert).",
        discussion: ExitStatus.interruptible)

    @OptionGroup var format: FormatOption
    @OptionGroup var share: ShareOption
    @Option(name: .customShort("O"), help: ArgumentHelp("Output format: qcow2 or raw.", valueName: "output_fmt")) var outputFormat: String = "raw"
    @Option(name: .customShort("o"), help: ArgumentHelp("Output format options (as for create).", valueName: "options")) var options: [String] = []
    @Flag(name: .customShort("c"), help: "Compress the output clusters (qcow2).") var compress = false
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

    func run() throws {
        let outFmt: ImageFormat
        do { outFmt = try ImageFormat(name: outputFormat, path: target) } catch {
            throw CommandFailure(message: "Unknown file format '\(outputFormat)'")
        }
        let list = try OptionList(options)
        var o = ConvertOptions()
        if let c = cache {
            guard ["none", "writeback", "writethrough", "directsync", "unsafe"].contains(c) else {
                throw CommandFailure(message: "Invalid cache option: \(c)")
            }
            o.durable = c != "unsafe"
        }
        o.create.format = outFmt
        if outFmt == .qcow2 {
            for (k, _) in list.values where !["cluster_size", "compat", "refcount_bits", "lazy_refcounts", "extended_l2", "compression_type", "preallocation"].contains(k) {
                throw CommandFailure(message: "\(target): Invalid parameter '\(k)'")
            }
            if let late = try list.applyQCow2Options(to: &o.create) { throw CommandFailure(message: "\(target): \(late)") }
        } else if let k = list.values.first(where: { $0.key != "preallocation" })?.key {
            throw CommandFailure(message: "\(target): Invalid parameter '\(k)'")
        }
        if let v = list.value("preallocation") {
            guard let p = CreateOptions.Preallocation(rawValue: v) else {
                throw CommandFailure(message: "\(target): Parameter 'preallocation' does not accept value '\(v)'")
            }
            o.create.preallocation = p
        }
        if compress && outFmt != .qcow2 { throw CommandFailure(message: "Compression not supported for this file format") }
        o.compressed = compress
        o.skipCreate = noCreate
        o.minSparse = sparse?.value ?? 4096
        o.copyBitmaps = bitmaps
        o.skipBrokenBitmaps = skipBroken
        if let b = backing {
            guard outFmt == .qcow2 else { throw CommandFailure(message: "\(target): Backing file not supported for file format '\(outFmt.rawValue)'") }
            o.backingFile = b
            o.backingFormat = try backingFormat.map { try ImageFormat(name: $0, path: b) }
                ?? ImageOpener.probe(try BlockFile(path: ImageOpener.resolveBacking(b, relativeTo: target)))
        }
        var opener = ImageOpener()
        opener.forceShare = share.forceShare
        let src = try opener.open(source, format: try format.imageFormat(path: source))
        let bar = ProgressReporter(enabled: showProgress && !quiet)
        o.shouldStop = { Interruption.requested }
        Interruption.install()
        do {
            try ConvertOperation.run(source: src, target: target, options: o) { done, total in bar.update(done, total) }
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
