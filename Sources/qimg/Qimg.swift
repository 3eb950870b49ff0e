import ArgumentParser
import QCow2
#if canImport(Glibc)
import Glibc
#endif

@main
struct Qimg: ParsableCommand {
    /// The one place the version lives (`qimg --version`, `qimg -V`).
    static let version = "0.3.0"
    static let versionLine = "qimg version \(version) (qemu-img 7.2 compatible)"

    /// The configuration ArgumentParser reads: the standard one, except during the quick
    /// parse (`parse(_:)`).
    static var configuration: CommandConfiguration {
        quickParse ? quickConfiguration : standardConfiguration
    }

    /// Set only while `parse(_:)` runs its quick parse.
    nonisolated(unsafe) private static var quickParse = false

    /// The standard configuration with a super-command name: ArgumentParser then skips its
    /// `--generate-completion-script` pass (two more parses of the arguments, built by
    /// reflection: a sixth of a short command's start-up). The name would show only in help
    /// and usage texts, which are rendered after the parse, with the standard configuration.
    private static let quickConfiguration: CommandConfiguration = {
        var c = standardConfiguration
        c._superCommandName = "qimg"
        return c
    }()

    private static let standardConfiguration = CommandConfiguration(
        commandName: "qimg",
        abstract: "Inspect and maintain qcow2 disk images (qemu-img compatible).",
        discussion: """
            Each command's --help lists its exit status. Most exit 0 on success and 1 on any \
            error (a usage error included); check, compare, backup and convert have more codes.
            """,
        subcommands: [Create.self, Info.self, Map.self, Check.self, IO.self, Resize.self, Amend.self, Bitmap.self, Convert.self, Backup.self, Repo.self, Compare.self, Commit.self, Rebase.self, Measure.self, Snapshot.self])

    @Flag(name: [.customShort("V"), .customLong("version")], help: "Show the version and exit.")
    var showVersion = false

    /// Only without a subcommand: `qimg -V`/`--version`, or bare `qimg` (an error, as in qemu-img).
    func run() throws {
        if showVersion { return Self.printVersion() }
        Output.error("qimg: Not enough arguments")
        Output.error("Try 'qimg --help' for more information")
        throw ExitCode(1)
    }

    static func main() {
        do {
            #if QIMG_FAULT_INJECTION
            // Testing aid, debug builds only: the command runs inside the scope of the fault
            // plan in QIMG_FAULTS (FaultPlan(specification:)); unset in normal use.
            if let injector = try FaultInjector.fromEnvironment() {
                try injector.scope { try parseAndRun() }
                return
            }
            #endif
            try parseAndRun()
        } catch let e as QCow2Error {
            fail(ErrorText.line(e), code: 1)
        } catch let e as CommandFailure {
            fail(e.message, code: e.exitCode)
        } catch let e as ExitCode {
            Glibc.exit(e.rawValue)
        } catch {
            let code = exitCode(for: error)
            if code == .success {
                // --help and similar: the full text on stdout.
                print(fullMessage(for: error))
                Glibc.exit(0)
            }
            let msg = message(for: error).split(separator: "\n").first.map(String.init) ?? "invalid arguments"
            fail(msg.hasPrefix("Error: ") ? String(msg.dropFirst(7)) : msg, code: 1)
        }
    }

    /// Parses the command line and runs the command.
    static func parseAndRun() throws {
        // Arguments are bytes: file names that are not UTF-8 pass through unchanged.
        var arguments = (1..<Int(CommandLine.argc)).map { i in
            PathCodec.decode(cString: CommandLine.unsafeArgv[i]!)
        }
        // `qimg --version` alone needs no parser (a third of its start-up).
        if arguments == ["--version"] || arguments == ["-V"] { return printVersion() }
        if arguments.first == "resize" { arguments = Resize.sizeLast(arguments) }
        var command = try parse(arguments)
        // ArgumentParser takes the root's -V/--version after a subcommand too: refuse it there.
        if !(command is Qimg), let flag = arguments.prefix(while: { $0 != "--" })
            .first(where: { $0 == "-V" || $0 == "--version" }) {
            fail("Unknown option '\(flag)'", code: 1)
        }
        try command.run()
    }

    static func printVersion() { Output.out(versionLine + "\n") }

    /// `parseAsRoot`, without the completion-script pass when it cannot find anything: with
    /// no argument starting with `--generate-completion-script` it never does. A quick parse
    /// that fails is run again the standard way (the error as it always was).
    static func parse(_ arguments: [String]) throws -> ParsableCommand {
        if !arguments.contains(where: { $0.hasPrefix("--generate-completion-script") }) {
            quickParse = true
            defer { quickParse = false }
            if let command = try? parseAsRoot(arguments) { return command }
        }
        return try parseAsRoot(arguments)
    }

    static func fail(_ message: String, code: Int32) -> Never {
        // One line: multi-part messages are joined.
        Output.error("qimg: " + message.split(separator: "\n").joined(separator: " "))
        Glibc.exit(code)
    }
}

/// The exit status lines of the commands' --help (check, compare and io write their own).
enum ExitStatus {
    static let plain = "Exit status: 0 success, 1 failure (any error, a usage error included)."
    /// backup and convert: a signal stops the copy and leaves the target as it was.
    static let interruptible = """
        Exit status: 0 success, 1 failure (any error, a usage error included), 130 interrupted by \
        SIGINT, 143 interrupted by SIGTERM.
        """
}

/// A command-level failure with its own exit code (e.g. check's 63).
struct CommandFailure: Error {
    var message: String
    var exitCode: Int32 = 1
}

/// stdout and stderr. File names that are not UTF-8 are printed as the bytes they are.
enum Output {
    static func out(_ s: String) { emit(1, s) }
    static func error(_ s: String) { emit(2, s + "\n") }
    /// Bytes as they are (`OutputBuffer`).
    static func out(bytes: [UInt8]) { bytes.withUnsafeBufferPointer { writeAll(1, $0) } }
    private static func emit(_ fd: Int32, _ s: String) {
        if PathCodec.hasEscapes(s) {
            PathCodec.encode(s).withUnsafeBufferPointer { writeAll(fd, $0) }
        } else {
            var s = s
            s.withUTF8 { writeAll(fd, $0) }
        }
    }
    private static func writeAll(_ fd: Int32, _ b: UnsafeBufferPointer<UInt8>) {
        var done = 0
        while done < b.count {
            let n = write(fd, b.baseAddress! + done, b.count - done)
            if n < 0 { if errno == EINTR { continue }; return }
            done += n
        }
    }
}
