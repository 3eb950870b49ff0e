import ArgumentParser
import QCow2

struct Compare: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "compare",
        abstract: "Check whether two images have the same guest content (qemu-img compare).",
        discussion: """
            Exit status (qemu-img's): 0 identical, 1 different (or a usage error), 2 an image \
            could not be opened, 3 block status could not be read, 4 data could not be read.
            """)

    @Option(name: .customShort("f"), help: ArgumentHelp("Format of the first image (qcow2 or raw); probed when omitted.", valueName: "fmt")) var format1: String?
    @Option(name: .customShort("F"), help: ArgumentHelp("Format of the second image; probed when omitted.", valueName: "fmt")) var format2: String?
    @Flag(name: .customShort("s"), help: "Strict: sizes and allocation must match too.") var strict = false
    @Flag(name: .customShort("p"), help: "Show progress.") var showProgress = false
    @Flag(name: .customShort("q"), help: "Quiet: print nothing, only set the exit status.") var quiet = false
    @OptionGroup var share: ShareOption
    @Argument(help: "The two images.") var files: [String] = []

    func run() throws {
        guard files.count == 2 else { throw CommandFailure(message: "Expecting two image file names") }
        var opener = ImageOpener()
        opener.forceShare = share.forceShare
        let first: any DiskImage, second: any DiskImage
        do {
            first = try opener.open(files[0], format: try format1.map { try ImageFormat(name: $0, path: files[0]) })
            second = try opener.open(files[1], format: try format2.map { try ImageFormat(name: $0, path: files[1]) })
        } catch let e as QCow2Error {
            throw CommandFailure(message: ErrorText.text(e), exitCode: 2)
        }
        let progress = QemuProgress(enabled: showProgress && !quiet, step: 2)
        let report: CompareReport
        do {
            report = try CompareOperation.run(first, second, strict: strict) { done, total in
                progress.update(done, total)
            }
        } catch let e as QCow2Error {
            // qemu-img's exit status: 3 block status could not be read, 4 data could not be read.
            guard case .compareFailed(_, _, _, let step, _) = e else { throw e }
            throw CommandFailure(message: e.description, exitCode: step == .read ? 4 : 3)
        }
        func say(_ s: String) { if !quiet { Output.out(s + "\n") } }
        if report.sizeWarning { say("Warning: Image size mismatch!") }
        let code: Int32
        switch report.verdict {
        case .identical:
            progress.update(1, 1)
            say("Images are identical.")
            code = 0
        case .contentMismatch(let offset):
            say("Content mismatch at offset \(offset)!")
            code = 1
        case .sizeMismatch:
            say("Strict mode: Image size mismatch!")
            code = 1
        case .statusMismatch(let offset):
            say("Strict mode: Offset \(offset) block status mismatch!")
            code = 1
        }
        progress.finish()
        if code != 0 { throw ExitCode(code) }
    }
}

/// qemu-img's progress output (-p): "    (P/100%)\r" on standard output whenever the
/// percentage moved by at least `step`, and a newline at the end.
final class QemuProgress {
    let enabled: Bool
    let step: Double
    var last = -1.0

    init(enabled: Bool, step: Double) {
        self.enabled = enabled
        self.step = step
    }

    func update(_ done: UInt64, _ total: UInt64) {
        guard enabled else { return }
        let pct = total == 0 ? 100 : min(100, Double(done) * 100 / Double(total))
        guard last < 0 || pct - last >= step || (pct == 100 && last < 100) else { return }
        last = pct
        Output.out("    (\(Human.format("%.2f", pct))/100%)\r")
    }

    func finish() {
        guard enabled else { return }
        Output.out("\n")
    }
}
