import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Crash tests: `qimg io` runs a long seeded list of writes, zero writes, discards and
/// flushes and is SIGKILLed after a random delay. After every kill:
///
/// (a) `qemu-img check` must find no corruption (leaks are allowed: exit 0 or 3);
/// (b) every command whose output line was printed before the kill must be in the
///     guest content (`qemu-img convert -O raw`), and the bytes of the one command in
///     flight (the first printing command without a line; flushes print nothing) may
///     hold their old or their new value, byte by byte; nothing else may differ.
///
/// The next run continues on the crashed image. At the end (c) qimg must still
/// open the image for writing, the result must check clean of corruption and match
/// the shadow exactly; internal snapshots and backing files must be untouched.
///
/// The command lists come from a seed: a random one per run, or QIMG_CRASH_SEED=N.
/// Kill timing is not reproducible, so a failure also writes the commands of the
/// failing run into the case directory (kept with QIMG_KEEP_FIXTURES=1).

struct CrashCase: Sendable, CustomTestStringConvertible {
    var name: String
    /// Commands (first word the tool) that build `img.qcow2` in a fresh directory.
    var setup: [[String]]
    var clusterSize: UInt64
    /// Half of the offsets and lengths are aligned to this (the subcluster with extended L2).
    var granule: UInt64
    /// An internal snapshot whose content must survive the crashes.
    var snapshot: String? = nil
    /// A backing file that must not change.
    var backing: String? = nil
    /// The workload must make the refcount table grow.
    var growsRefcountTable = false
    var seedOffset: UInt64
    var testDescription: String { name }

    static let all: [CrashCase] = [
        CrashCase(name: "v3-64k", setup: [["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "16M"]],
                  clusterSize: 65536, granule: 65536, seedOffset: 1),
        CrashCase(name: "c512-rb64-growth", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", "img.qcow2", "8M"],
        ], clusterSize: 512, granule: 512, growsRefcountTable: true, seedOffset: 2),
        CrashCase(name: "xl2-64k", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "img.qcow2", "16M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x21 5000 70000", "-c", "write -z 300k 6k", "img.qcow2"],
        ], clusterSize: 65536, granule: 2048, seedOffset: 3),
        CrashCase(name: "overlay-on-qcow2", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "16M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 3M", "-c", "write -P 0x42 9M 2M", "base.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2"],
        ], clusterSize: 65536, granule: 65536, backing: "base.qcow2", seedOffset: 4),
        CrashCase(name: "internal-snapshot", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "16M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x81 0 4M", "-c", "write -P 0x82 10M 1M", "img.qcow2"],
            ["qemu-img", "snapshot", "-c", "s1", "img.qcow2"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x83 1M 64k", "img.qcow2"],
        ], clusterSize: 65536, granule: 65536, snapshot: "s1", seedOffset: 5),
    ]
}

/// One `qimg io` command and its effect on the guest content.
struct CrashCommand: CustomStringConvertible {
    enum Op { case write(UInt8), zero(unmap: Bool), discard, flush }
    var op: Op
    var offset: UInt64 = 0
    var length: UInt64 = 0

    var description: String {
        switch op {
        case .write(let p): return "write -P \(p) \(offset) \(length)"
        case .zero(let unmap): return "write -z\(unmap ? " -u" : "") \(offset) \(length)"
        case .discard: return "discard \(offset) \(length)"
        case .flush: return "flush"
        }
    }

    /// The line qimg prints when the command has completed (none for flush).
    var outputLine: String? {
        switch op {
        case .write, .zero: return "wrote \(length)/\(length) bytes at offset \(offset)"
        case .discard: return "discard \(length)/\(length) bytes at offset \(offset)"
        case .flush: return nil
        }
    }

    /// Applies the command to a raw image. Discards zero whole clusters only (v3
    /// images read discarded clusters as zeros) and leave partial clusters alone.
    func apply(to raw: inout [UInt8], clusterSize cs: UInt64) {
        switch op {
        case .write(let p): Self.fill(&raw, offset, offset + length, p)
        case .zero: Self.fill(&raw, offset, offset + length, 0)
        case .discard:
            let a = (offset + cs - 1) & ~(cs - 1)
            let b = (offset + length) & ~(cs - 1)
            if a < b { Self.fill(&raw, a, b, 0) }
        case .flush: break
        }
    }

    static func fill(_ raw: inout [UInt8], _ from: UInt64, _ to: UInt64, _ value: UInt8) {
        raw.withUnsafeMutableBytes { b in
            _ = memset(b.baseAddress! + Int(from), Int32(value), Int(to - from))
        }
    }

    /// A seeded list of `count` commands on an image of `size` bytes, with a flush every few commands.
    static func list(_ count: Int, size: UInt64, granule: UInt64, clusterSize: UInt64,
                     rng: inout SeededRNG) -> [CrashCommand] {
        var out: [CrashCommand] = []
        var untilFlush = Int.random(in: 2...6, using: &rng)
        while out.count < count {
            if untilFlush == 0 {
                out.append(CrashCommand(op: .flush))
                untilFlush = Int.random(in: 2...6, using: &rng)
                continue
            }
            untilFlush -= 1
            // Mostly short requests, sometimes long ones (many clusters, many L2 tables with small clusters).
            let long = UInt64.random(in: 0..<3, using: &rng) == 0
            let maxLen = min(size, long ? 4 << 20 : max(clusterSize * 3, 256 << 10))
            var len = UInt64.random(in: 1...maxLen, using: &rng)
            var off = UInt64.random(in: 0..<size, using: &rng)
            if Bool.random(using: &rng) { off &= ~(granule - 1) }
            if Bool.random(using: &rng) { len = max(granule, len & ~(granule - 1)) }
            len = min(len, size - off)
            let op: Op
            switch UInt64.random(in: 0..<10, using: &rng) {
            case 0..<6: op = .write(UInt8.random(in: 1...255, using: &rng))
            case 6, 7: op = .zero(unmap: Bool.random(using: &rng))
            default: op = .discard
            }
            out.append(CrashCommand(op: op, offset: off, length: len))
        }
        return out
    }
}

/// How a `qimg io` run ended.
struct KilledRun {
    var killed: Bool
    var status: Int32
    var stdout: String
    var stderr: String

    /// The complete lines of stdout (a line cut by the kill is not counted).
    var completeLines: [String] {
        var lines = stdout.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        lines.removeLast()  // after the last newline: empty, or an incomplete line
        return lines
    }
}

@Suite struct CrashTests {
    /// Kills per case: 5 cases x 5 = 25 kills per run.
    static let killsPerCase = 5
    /// Runs that complete before their kill do not count; give up after this many runs.
    static let maxRunsPerCase = 15
    /// Enough to outlast 300 ms mostly; qimg's argument parsing time grows quadratically
    /// with the number of -c options (about 0.3 s for 450 in a debug build).
    static let commandsPerRun = 450

    static let baseSeed: UInt64 = {
        if let s = ProcessInfo.processInfo.environment["QIMG_CRASH_SEED"], let v = UInt64(s) { return v }
        return UInt64.random(in: 1...UInt64(UInt32.max))
    }()

    static func tool(_ args: [String], cwd: String) throws -> RunResult {
        let r = args[0] == "qemu-io" ? try Runner.qemuIO(Array(args.dropFirst()), cwd: cwd)
                                      : try Runner.qemuImg(Array(args.dropFirst()), cwd: cwd)
        guard r.exitedNormally, r.status == 0 else { throw TestFailure("\(r.summary): \(r.err)") }
        return r
    }

    static func raw(_ dir: String, _ extra: [String] = []) throws -> [UInt8] {
        _ = try tool(["qemu-img", "convert"] + extra + ["-O", "raw", "img.qcow2", "crash-out.raw"], cwd: dir)
        defer { try? FileManager.default.removeItem(atPath: dir + "/crash-out.raw") }
        return [UInt8](try Data(contentsOf: URL(fileURLWithPath: dir + "/crash-out.raw")))
    }

    static func fileBytes(_ path: String) throws -> Data {
        try Data(contentsOf: URL(fileURLWithPath: path))
    }

    /// refcount_table_clusters from the header.
    static func refcountTableClusters(_ path: String) throws -> UInt32 {
        let d = try fileBytes(path)
        return d[56..<60].reduce(0) { $0 << 8 | UInt32($1) }
    }

    /// nil when `qemu-img check` finds no corruption (leaks allowed), else what it said.
    static func checkProblem(_ dir: String) throws -> String? {
        let r = try Runner.qemuImg(["check", "--output=json", "img.qcow2"], cwd: dir)
        guard r.exitedNormally, r.status == 0 || r.status == 3 else { return "\(r.summary): \(r.out)\(r.err)" }
        guard let json = try? JSONSerialization.jsonObject(with: r.stdout) as? [String: Any] else {
            return "unparsable output: \(r.out)"
        }
        for key in ["corruptions", "check-errors"] {
            if let n = json[key] as? Int, n != 0 { return "\(key): \(n): \(r.out)" }
        }
        return nil
    }

    /// Starts qimg with `args` in `cwd` (on `img.qcow2`) and SIGKILLs it `delay` seconds after
    /// it has locked the image, unless it has ended.
    static func runAndKill(_ args: [String], cwd: String, after delay: Double) throws -> KilledRun {
        guard FileManager.default.isExecutableFile(atPath: Qimg.path) else {
            throw TestFailure("qimg binary not found at \(Qimg.path): run `swift build` first")
        }
        let outPath = cwd + "/run.out", errPath = cwd + "/run.err"
        guard FileManager.default.createFile(atPath: outPath, contents: nil),
              FileManager.default.createFile(atPath: errPath, contents: nil),
              let out = FileHandle(forWritingAtPath: outPath), let err = FileHandle(forWritingAtPath: errPath)
        else { throw TestFailure("cannot create \(outPath)") }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Qimg.path)
        p.arguments = args
        p.currentDirectoryURL = URL(fileURLWithPath: cwd)
        p.environment = Runner.environment
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = out
        p.standardError = err
        let done = DispatchSemaphore(value: 0)
        p.terminationHandler = { _ in done.signal() }
        do { try p.run() } catch {
            try? out.close(); try? err.close()
            throw TestFailure("cannot start qimg: \(error)")
        }
        try? out.close()
        try? err.close()
        // The delay counts from the moment qimg holds its write lock (byte 101), i.e. has
        // opened the image: parsing a long command list takes a while by itself.
        var st = stat()
        let inode = stat(cwd + "/img.qcow2", &st) == 0 ? UInt64(st.st_ino) : 0
        let deadline = Date().addingTimeInterval(5)
        while p.isRunning && !lockHeld(inode: inode, byte: 101) && Date() < deadline { usleep(500) }
        if done.wait(timeout: .now() + delay) == .timedOut {
            kill(p.processIdentifier, SIGKILL)
            done.wait()
        }
        let killed = p.terminationReason == .uncaughtSignal && p.terminationStatus == SIGKILL
        return KilledRun(killed: killed, status: p.terminationStatus,
                         stdout: (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "",
                         stderr: (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "")
    }

    /// Index of the first byte where `a` and `b` differ in [from, to), or nil.
    static func firstDifference(_ a: [UInt8], _ b: [UInt8], _ from: Int, _ to: Int) -> Int? {
        guard from < to else { return nil }
        return a.withUnsafeBytes { pa in
            b.withUnsafeBytes { pb -> Int? in
                if memcmp(pa.baseAddress! + from, pb.baseAddress! + from, to - from) == 0 { return nil }
                var i = from
                while i < to && pa[i] == pb[i] { i += 1 }
                return i
            }
        }
    }

    @Test(.requiresQEMU, .timeLimit(.minutes(3)), arguments: CrashCase.all)
    func killedWriterLeavesConsistentImage(_ c: CrashCase) throws {
        let dir = Paths.scratch + "/crash-\(c.name)-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        var keep = false
        defer { if !keep { try? FileManager.default.removeItem(atPath: dir) } }
        for cmd in c.setup { _ = try Self.tool(cmd, cwd: dir) }
        let seed = Self.baseSeed &+ c.seedOffset &* 1_000_003
        let img = dir + "/img.qcow2"
        let initialRefcountTable = try Self.refcountTableClusters(img)
        let snapshotContent = try c.snapshot.map { try Self.raw(dir, ["-l", "snapshot.name=\($0)"]) }
        let backingBytes = try c.backing.map { try Self.fileBytes(dir + "/" + $0) }

        var shadow = try Self.raw(dir)
        let size = UInt64(shadow.count)
        var rng = SeededRNG(state: seed)
        var kills = 0, completed = 0, runs = 0, halfDone = 0

        func fail(_ run: Int, _ commands: [CrashCommand], _ what: String) {
            keep = true
            let file = dir + "/commands-run\(run).txt"
            try? commands.map(\.description).joined(separator: "\n").write(toFile: file, atomically: true, encoding: .utf8)
            Issue.record("""
                \(c.name): run \(run), QIMG_CRASH_SEED=\(Self.baseSeed): \(what)
                    image and commands in \(dir) (kept with QIMG_KEEP_FIXTURES=1)
                """)
        }

        while kills < Self.killsPerCase && runs < Self.maxRunsPerCase {
            runs += 1
            let commands = CrashCommand.list(Self.commandsPerRun, size: size, granule: c.granule,
                                             clusterSize: c.clusterSize, rng: &rng)
            let delay = Double(UInt64.random(in: 3...300, using: &rng)) / 1000
            let r = try Self.runAndKill(["io"] + commands.flatMap { ["-c", $0.description] } + ["img.qcow2"],
                                        cwd: dir, after: delay)
            if !r.killed && r.status != 0 {
                fail(runs, commands, "qimg io exited with \(r.status): \(r.stderr)")
                return
            }
            // Which commands completed, and which one was in flight.
            let printing = commands.filter { $0.outputLine != nil }
            let lines = r.completeLines
            if lines.count > printing.count || zip(lines, printing).contains(where: { $0.0 != $0.1.outputLine }) {
                fail(runs, commands, "unexpected output:\n\(r.stdout)")
                return
            }
            if !r.killed && lines.count != printing.count {
                fail(runs, commands, "exit 0 after \(lines.count) of \(printing.count) output lines")
                return
            }
            var expected = shadow
            for cmd in printing[0..<lines.count] { cmd.apply(to: &expected, clusterSize: c.clusterSize) }
            let inFlight = r.killed && lines.count < printing.count ? printing[lines.count] : nil
            let when = r.killed
                ? "killed after \(Int(delay * 1000)) ms, \(lines.count) commands done, in flight: \(inFlight.map(\.description) ?? "none")"
                : "completed"

            // (a) No corruption.
            if let problem = try Self.checkProblem(dir) {
                fail(runs, commands, "\(when): qemu-img check: \(problem)")
                return
            }
            // (b) Done commands are there; the one in flight is old or new, byte by byte.
            let actual = try Self.raw(dir)
            guard actual.count == expected.count else {
                fail(runs, commands, "\(when): guest size \(actual.count), expected \(expected.count)")
                return
            }
            var lo = actual.count, hi = actual.count
            var newer = expected
            if let f = inFlight {
                f.apply(to: &newer, clusterSize: c.clusterSize)
                lo = Int(f.offset)
                hi = Int(f.offset + f.length)
            }
            if let i = Self.firstDifference(actual, expected, 0, lo) ?? Self.firstDifference(actual, expected, hi, actual.count) {
                fail(runs, commands, "\(when): byte \(i) is \(actual[i]), expected \(expected[i]) (outside the command in flight)")
                return
            }
            if let i = (lo..<hi).first(where: { actual[$0] != expected[$0] && actual[$0] != newer[$0] }) {
                fail(runs, commands, "\(when): byte \(i) of the command in flight is \(actual[i]), neither old \(expected[i]) nor new \(newer[i])")
                return
            }
            shadow = actual
            if inFlight != nil && Self.firstDifference(actual, expected, lo, hi) != nil
                && Self.firstDifference(actual, newer, lo, hi) != nil { halfDone += 1 }
            if r.killed { kills += 1 } else { completed += 1 }
        }
        print("CrashTests \(c.name): \(kills) kills (\(halfDone) in the middle of a command), \(completed) runs completed first, QIMG_CRASH_SEED=\(Self.baseSeed)")
        #expect(kills >= Self.killsPerCase, "\(c.name): only \(kills) of \(runs) runs were killed (\(completed) completed first)")

        // (c) The image stays usable: a full write, then more random commands, to completion.
        var commands = [CrashCommand(op: .write(0xa5), offset: 0, length: size)]
        commands += CrashCommand.list(30, size: size, granule: c.granule, clusterSize: c.clusterSize, rng: &rng)
        let r = try Qimg.run(["io"] + commands.flatMap { ["-c", $0.description] } + ["img.qcow2"], cwd: dir, timeout: 120)
        let expectedLines = commands.compactMap(\.outputLine)
        guard r.exitedNormally, r.status == 0, r.out.split(separator: "\n").map(String.init) == expectedLines else {
            fail(runs + 1, commands, "re-opening after the crashes: \(r.summary): \(r.err)")
            return
        }
        for cmd in commands { cmd.apply(to: &shadow, clusterSize: c.clusterSize) }
        if let problem = try Self.checkProblem(dir) {
            fail(runs + 1, commands, "after the final run: qemu-img check: \(problem)")
            return
        }
        let final = try Self.raw(dir)
        if let i = Self.firstDifference(final, shadow, 0, min(final.count, shadow.count)) ?? (final.count == shadow.count ? nil : final.count) {
            fail(runs + 1, commands, "after the final run: content differs at byte \(i)")
        }
        if let name = c.snapshot, let before = snapshotContent {
            let now = try Self.raw(dir, ["-l", "snapshot.name=\(name)"])
            #expect(now.count == before.count && Self.firstDifference(now, before, 0, now.count) == nil,
                    "\(c.name): snapshot \(name) changed")
        }
        if let name = c.backing, let before = backingBytes {
            #expect(try Self.fileBytes(dir + "/" + name) == before, "\(c.name): backing file \(name) changed")
        }
        if c.growsRefcountTable {
            let now = try Self.refcountTableClusters(img)
            #expect(now > initialRefcountTable, "\(c.name): refcount table did not grow (\(initialRefcountTable) clusters)")
        }
    }
}
