import Foundation
import Testing
import TestSupport

/// The command line itself: `--version`, bare `qimg`, every subcommand's --help
/// (value names, defaults, exit status), what the man pages and completion
/// scripts are generated from, and where `make install` puts them. Uses the
/// debug binary: `make install`'s release build is not repeated here.
@Suite struct CLIInterfaceTests {
    /// The subcommands `qimg --help` lists (so a new one is checked too).
    static func subcommands() throws -> [String] {
        let r = try Qimg.run(["--help"], cwd: Paths.packageRoot)
        guard r.exitedNormally, r.status == 0 else { throw TestFailure("qimg --help: \(r.summary)") }
        var names: [String] = []
        var inList = false
        for line in r.out.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("SUBCOMMANDS:") { inList = true; continue }
            guard inList else { continue }
            if line.isEmpty && !names.isEmpty { break }
            // "  create                  Create a new ...": the name starts at column 2.
            guard line.hasPrefix("  "), !line.hasPrefix("   ") else { continue }
            if let name = line.split(separator: " ").first, name.allSatisfy({ $0.isLetter || $0 == "-" }) {
                names.append(String(name))
            }
        }
        return names
    }

    @Test func rootHelpListsTheSubcommands() throws {
        let names = try Self.subcommands()
        for expected in ["create", "info", "map", "check", "io", "resize", "amend", "bitmap",
                         "convert", "backup", "compare", "commit", "rebase"] {
            #expect(names.contains(expected), "qimg --help does not list \(expected): \(names)")
        }
    }

    @Test(arguments: ["--version", "-V"])
    func version(_ flag: String) throws {
        let r = try Qimg.run([flag], cwd: Paths.packageRoot)
        #expect(r.exitedNormally && r.status == 0, "qimg \(flag): \(r.summary)")
        #expect(r.err.isEmpty, "qimg \(flag) wrote to stderr: \(r.err)")
        let line = /qimg version \d+\.\d+\.\d+ \(qemu-img 7\.2 compatible\)\n/
        #expect(r.out.wholeMatch(of: line) != nil, "qimg \(flag) printed \(r.out.debugDescription)")
    }

    /// -V/--version belong to qimg itself, not to a subcommand.
    @Test func versionAfterASubcommandIsRefused() throws {
        let dir = try Paths.newScratch("version")
        _ = FileManager.default.createFile(atPath: dir + "/disk.raw", contents: Data(count: 65536))
        let r = try Qimg.run(["info", "-V", "disk.raw"], cwd: dir)
        expectCleanFailure("qimg info -V disk.raw", r, exitCode: 1)
        #expect(r.out.isEmpty, "qimg info -V printed \(r.out.prefix(200))")
        #expect(r.err.contains("Unknown option '-V'"), "qimg info -V: \(r.err)")
    }

    /// Bare `qimg` fails as bare `qemu-img` does: exit 1, two lines on stderr.
    @Test func bareQimgIsAnError() throws {
        let r = try Qimg.run([], cwd: Paths.packageRoot)
        #expect(r.exitedNormally && r.status == 1, "qimg: \(r.summary)")
        #expect(r.out.isEmpty, "bare qimg printed on stdout: \(r.out.prefix(200))")
        #expect(r.stderrLines == ["qimg: Not enough arguments", "Try 'qimg --help' for more information"])
        if Env.qemuImg != nil {
            let qemu = try Runner.qemuImg([])
            #expect(qemu.status == r.status, "qemu-img exits \(qemu.status), qimg \(r.status)")
            #expect(qemu.stderrLines.map { $0.replacingOccurrences(of: "qemu-img", with: "qimg") } == r.stderrLines)
        }
    }

    @Test(arguments: [["--help"], ["-h"], ["help"], ["help", "bitmap"], ["convert", "--help"], ["bitmap", "--help"]])
    func helpExitsZero(_ args: [String]) throws {
        let r = try Qimg.run(args, cwd: Paths.packageRoot)
        #expect(r.exitedNormally && r.status == 0, "qimg \(args.joined(separator: " ")): \(r.summary)")
        #expect(r.out.contains("USAGE: qimg"), "qimg \(args.joined(separator: " ")) printed no usage")
        #expect(r.err.isEmpty, "qimg \(args.joined(separator: " ")) wrote to stderr: \(r.err)")
    }

    /// The OPTIONS entries of a --help text, each joined into one line.
    static func optionEntries(_ help: String) -> [String] {
        var entries: [String] = []
        var inOptions = false
        for line in help.split(separator: "\n", omittingEmptySubsequences: false) {
            if line.hasPrefix("OPTIONS:") { inOptions = true; continue }
            guard inOptions else { continue }
            if !line.hasPrefix(" ") {
                if !line.isEmpty { inOptions = false }
                continue
            }
            let text = line.trimmingCharacters(in: .whitespaces)
            if line.hasPrefix("  -") { entries.append(text) } else if !entries.isEmpty { entries[entries.count - 1] += " " + text }
        }
        return entries
    }

    @Test func everySubcommandHelp() throws {
        let names = try Self.subcommands()
        try #require(names.count >= 13, "subcommands found: \(names)")
        for name in names {
            let r = try Qimg.run([name, "--help"], cwd: Paths.packageRoot)
            #expect(r.exitedNormally && r.status == 0, "qimg \(name) --help: \(r.summary)")
            let help = r.out
            // Value names say what goes there (<fmt>, <backing_file>), not the option's letter.
            let letter = /<[A-Za-z]>/
            for m in help.matches(of: letter) {
                Issue.record("qimg \(name) --help: single-letter placeholder \(m.output)")
            }
            #expect(!help.contains("[<arguments> ...]"), "qimg \(name) --help: usage shows [<arguments> ...]")
            #expect(help.contains("Exit status"), "qimg \(name) --help does not document its exit status")
            let entries = Self.optionEntries(help)
            #expect(entries.contains { $0.hasPrefix("-h, --help") }, "qimg \(name) --help: OPTIONS not found")
            for entry in entries where entry.components(separatedBy: "(default").count > 2 {
                Issue.record("qimg \(name) --help: the default is given twice: \(entry)")
            }
        }
    }

    /// The exit codes each --help documents are the ones the command uses.
    @Test func documentedExitCodes() throws {
        // One line: the help text is wrapped at 80 columns.
        func help(_ name: String) throws -> String {
            try Qimg.run([name, "--help"], cwd: Paths.packageRoot).out.replacingOccurrences(of: "\n", with: " ")
        }
        let check = try help("check")
        for code in ["0 no errors", "1 the check could not be completed", "2 corruptions", "3 only", "63 the image format"] {
            #expect(check.contains(code), "qimg check --help does not say '\(code)'")
        }
        let compare = try help("compare")
        for code in ["0 identical", "1 different", "2 an image", "3 block status", "4 data"] {
            #expect(compare.contains(code), "qimg compare --help does not say '\(code)'")
        }
        for name in ["backup", "convert"] {
            let text = try help(name)
            for code in ["130 interrupted by SIGINT", "143 interrupted by SIGTERM"] {
                #expect(text.contains(code), "qimg \(name) --help does not say '\(code)'")
            }
        }
        // check's 63 and compare's 2, as documented.
        let dir = try Paths.newScratch("exit-codes")
        _ = FileManager.default.createFile(atPath: dir + "/disk.raw", contents: Data(count: 65536))
        let raw = try Qimg.run(["check", "-f", "raw", "disk.raw"], cwd: dir)
        #expect(raw.exitedNormally && raw.status == 63, "qimg check -f raw: \(raw.summary)")
        let missing = try Qimg.run(["compare", "disk.raw", "missing.raw"], cwd: dir)
        #expect(missing.exitedNormally && missing.status == 2, "qimg compare with a missing image: \(missing.summary)")
    }

    /// Docs/cli.md documents the exit status in every subcommand's section.
    @Test func cliDocumentsExitStatus() throws {
        let doc = try String(contentsOfFile: Paths.packageRoot + "/Docs/cli.md", encoding: .utf8)
        let sections = doc.components(separatedBy: "\n## ")
        for name in try Self.subcommands() {
            let section = sections.first { $0.hasPrefix("qimg \(name)\n") }
            #expect(section != nil, "Docs/cli.md has no '## qimg \(name)' section")
            if let section {
                #expect(section.contains("Exit status"), "Docs/cli.md: '## qimg \(name)' does not give the exit status")
            }
        }
    }

    /// The man pages are generated from this JSON (swift-argument-parser's generate-manual).
    @Test func manualInputDescribesEveryCommand() throws {
        let r = try Qimg.run(["--experimental-dump-help"], cwd: Paths.packageRoot)
        #expect(r.exitedNormally && r.status == 0, "qimg --experimental-dump-help: \(r.summary)")
        let json = try #require(try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any])
        let root = try #require(json["command"] as? [String: Any])
        let subs = try #require(root["subcommands"] as? [[String: Any]])
        let names = subs.compactMap { $0["commandName"] as? String }
        #expect(Set(names).isSuperset(of: try Self.subcommands()), "dump-help lists \(names)")
        for sub in subs where sub["commandName"] as? String != "help" {
            let name = sub["commandName"] as? String ?? "?"
            #expect((sub["discussion"] as? String)?.contains("Exit status") == true, "\(name): no exit status in the man page")
            for arg in sub["arguments"] as? [[String: Any]] ?? [] {
                if arg["kind"] as? String == "option", let v = arg["valueName"] as? String, v.count == 1 {
                    Issue.record("\(name): value name '\(v)' in the man page")
                }
            }
        }
    }

    @Test(arguments: ["bash", "zsh", "fish"])
    func completionScript(_ shell: String) throws {
        let r = try Qimg.run(["--generate-completion-script", shell], cwd: Paths.packageRoot)
        #expect(r.exitedNormally && r.status == 0, "--generate-completion-script \(shell): \(r.summary)")
        for name in try Self.subcommands() {
            #expect(r.out.contains(name), "the \(shell) completion script does not mention \(name)")
        }
        switch shell {
        case "bash":
            // It parses, and sourcing it registers the completion for qimg.
            let dir = try Paths.newScratch("completion")
            try r.out.write(toFile: dir + "/qimg.bash", atomically: true, encoding: .utf8)
            let syntax = try Runner.run("/bin/bash", ["-n", dir + "/qimg.bash"])
            #expect(syntax.status == 0, "bash -n: \(syntax.err)")
            let loaded = try Runner.run("/bin/bash", ["-c", "source qimg.bash && complete -p qimg"], cwd: dir)
            #expect(loaded.status == 0 && loaded.out.contains("qimg"), "complete -p qimg: \(loaded.summary) \(loaded.err)")
        case "zsh":
            #expect(r.out.hasPrefix("#compdef qimg"), "zsh: site-functions needs '#compdef qimg' first")
        default:
            #expect(r.out.contains("complete -c 'qimg'"), "fish: no \"complete -c 'qimg'\"")
        }
    }

    /// `make -n install` and `make -n uninstall`: the release build and every destination.
    @Test func makeInstallDestinations() throws {
        let make = try #require(Env.which("make"), "make is not on PATH")
        // Neither the outer make of `make test` (MAKEFLAGS, MAKELEVEL) nor PREFIX/DESTDIR in the environment.
        func run(_ args: [String]) throws -> RunResult {
            try Runner.run("/usr/bin/env", ["-u", "MAKEFLAGS", "-u", "MFLAGS", "-u", "MAKELEVEL", "-u", "PREFIX", "-u", "DESTDIR", make, "--no-print-directory"] + args,
                           cwd: Paths.packageRoot)
        }
        let destinations = ["bin/qimg", "share/man/man1/qimg.1", "share/bash-completion/completions/qimg",
                            "share/zsh/site-functions/_qimg", "share/fish/vendor_completions.d/qimg.fish"]
        for (prefixArgs, prefix) in [([String](), "/usr/local"), (["PREFIX=/opt/q"], "/opt/q")] {
            // -B: as if nothing were built yet, so the build steps are listed too.
            let install = try run(["-n", "-B", "install", "DESTDIR=/stage", "SWIFT=swift"] + prefixArgs)
            #expect(install.status == 0, "make -n install: \(install.summary) \(install.err)")
            let lines = install.out.split(separator: "\n").map(String.init)
            // --disable-local-rpath: the installed binary must not look for libraries in its own directory.
            #expect(lines.contains("swift build -c release --static-swift-stdlib --disable-local-rpath --scratch-path .build-release"),
                    "make install does not do the static release build without a local run path:\n\(install.out)")
            #expect(lines.contains("install -D -m 755 .build-release/release/qimg /stage\(prefix)/bin/qimg"),
                    "make install does not install the binary to /stage\(prefix)/bin/qimg:\n\(install.out)")
            for d in destinations {
                #expect(lines.contains { $0.hasPrefix("install ") && $0.hasSuffix(" /stage\(prefix)/\(d)") },
                        "make install (\(prefix)) has no 'install ... /stage\(prefix)/\(d)':\n\(install.out)")
            }
            #expect(install.out.contains("\"/stage\(prefix)/share/man/man1/${page##*/}\""), "subcommand man pages")
            for shell in ["bash", "zsh", "fish"] {
                #expect(install.out.contains("--generate-completion-script \(shell)"), "no \(shell) completion generated")
            }
            let uninstall = try run(["-n", "uninstall", "DESTDIR=/stage"] + prefixArgs)
            #expect(uninstall.status == 0, "make -n uninstall: \(uninstall.summary)")
            let removed = uninstall.out.split(whereSeparator: { $0 == " " || $0 == "\n" }).map(String.init)
            for d in destinations + ["share/man/man1/qimg.*.1"] {
                #expect(removed.contains("/stage\(prefix)/\(d)"), "make uninstall does not remove /stage\(prefix)/\(d)")
            }
        }
    }
}
