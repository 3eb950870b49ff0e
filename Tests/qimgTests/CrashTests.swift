import Foundation
import Testing
import TestSupport
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
    /// Seconds from the moment the delay started to qimg's end (killed or not).
    var elapsed: Double = 0

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

    static func tool(_ args: [String], cwd: String) throws -> RunResult { try Runner.qemuStep(args, in: cwd) }

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

    /// Starts qimg with `args` in `cwd` (on `img.qcow2`) and SIGKILLs it `delay` seconds after
    /// it has locked the image, unless it has ended. `poll` is the polling interval (µs).
    /// With `afterOutputBytes`, the delay starts only once stdout holds that many bytes.
    static func runAndKill(_ args: [String], cwd: String, after delay: Double,
                           poll: useconds_t = 500, afterOutputBytes: Int = 0) throws -> KilledRun {
        guard FileManager.default.isExecutableFile(atPath: Qimg.path) else {
            throw TestFailure("qimg binary not found at \(Qimg.path): run `swift build` first")
        }
        let p = try Spawned(Qimg.path, args, cwd: cwd)
        let pollSeconds = Double(poll) / 1e6
        // The delay counts from the moment qimg holds its write lock (byte 101), i.e. has
        // opened the image: parsing a long command list takes a while by itself (and much
        // longer on a loaded machine). No deadline: qimg either locks or ends.
        while p.isRunning && !lockHeld(on: cwd + "/img.qcow2", byte: 101) { usleep(poll) }
        if afterOutputBytes > 0 {
            while p.isRunning {
                if p.outputBytes >= afterOutputBytes { break }
                usleep(poll)
            }
        }
        let started = Date()
        if !p.wait(timeout: delay, poll: pollSeconds) {
            p.send(SIGKILL)
            p.wait(timeout: Runner.backstopSeconds, poll: pollSeconds)
        }
        let elapsed = Date().timeIntervalSince(started)
        let killed = p.signaled && p.status == SIGKILL
        return KilledRun(killed: killed, status: p.status, stdout: p.out, stderr: p.err, elapsed: elapsed)
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

    @Test(.requiresQEMU, arguments: CrashCase.all)
    func killedWriterLeavesConsistentImage(_ c: CrashCase) throws {
        let dir = try Paths.newScratch("crash-\(c.name)")
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
            if let problem = try Runner.qemuCheckProblem("img.qcow2", dir, leaksAllowed: true) {
                fail(runs, commands, "\(when): \(problem)")
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
        if let problem = try Runner.qemuCheckProblem("img.qcow2", dir, leaksAllowed: true) {
            fail(runs + 1, commands, "after the final run: \(problem)")
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

// MARK: - Persistent bitmaps across kills

/// An image for the bitmap crash test: two enabled bitmaps (64 KiB and 512-byte
/// granularity) and a disabled one that already holds dirty bits.
struct BitmapCrashCase: Sendable, CustomTestStringConvertible {
    var name: String
    var createOptions: String
    var size: UInt64
    var clusterSize: UInt64
    var seedOffset: UInt64
    var testDescription: String { name }

    static let all: [BitmapCrashCase] = [
        BitmapCrashCase(name: "bitmaps-64k", createOptions: "cluster_size=65536", size: 16 << 20,
                        clusterSize: 65536, seedOffset: 11),
        BitmapCrashCase(name: "bitmaps-16k-xl2", createOptions: "cluster_size=16384,extended_l2=on", size: 24 << 20,
                        clusterSize: 16384, seedOffset: 12),
    ]
}

/// The dirty granules of one bitmap, one Bool per granule.
struct GranuleSet: Equatable, CustomStringConvertible {
    var granularity: UInt64
    var bits: [Bool]

    init(granularity: UInt64, size: UInt64) {
        self.granularity = granularity
        bits = [Bool](repeating: false, count: Int((size + granularity - 1) / granularity))
    }

    /// From extents [[start, length]] as qemu-nbd/nbdinfo or `qimg bitmap --dump` report them.
    init(granularity: UInt64, size: UInt64, extents: [[UInt64]]) {
        self.init(granularity: granularity, size: size)
        for e in extents { mark(e[0], e[1]) }
    }

    mutating func mark(_ offset: UInt64, _ length: UInt64) {
        guard length > 0 else { return }
        for g in Int(offset / granularity)...Int((offset + length - 1) / granularity) where g < bits.count { bits[g] = true }
    }

    mutating func mark(_ c: CrashCommand) {
        if case .flush = c.op { return }
        mark(c.offset, c.length)
    }

    func union(_ o: GranuleSet) -> GranuleSet {
        var r = self
        for i in bits.indices where o.bits[i] { r.bits[i] = true }
        return r
    }

    /// The first granule set here and not in `o`, as a guest offset.
    func firstOutside(_ o: GranuleSet) -> UInt64? {
        bits.indices.first { bits[$0] && !o.bits[$0] }.map { UInt64($0) * granularity }
    }

    var count: Int { bits.reduce(0) { $0 + ($1 ? 1 : 0) } }
    var description: String { "\(count) granules of \(granularity)" }
}

extension CrashTests {
    /// Kills per bitmap case: 2 cases x 20 = 40 kills per run (a few seconds).
    static let bitmapKillsPerCase = 20
    static let bitmapMaxRunsPerCase = 100

    /// flags and granularity of each bitmap `qemu-img info --output=json` lists.
    static func qemuBitmaps(_ dir: String) throws -> [String: (flags: [String], granularity: UInt64)] {
        let r = try tool(["qemu-img", "info", "--output=json", "img.qcow2"], cwd: dir)
        let json = try JSONSerialization.jsonObject(with: r.stdout) as? [String: Any] ?? [:]
        let data = (json["format-specific"] as? [String: Any])?["data"] as? [String: Any] ?? [:]
        var out: [String: (flags: [String], granularity: UInt64)] = [:]
        for b in data["bitmaps"] as? [[String: Any]] ?? [] {
            guard let name = b["name"] as? String else { continue }
            out[name] = (b["flags"] as? [String] ?? [], (b["granularity"] as? NSNumber)?.uint64Value ?? 0)
        }
        return out
    }

    /// qimg io is killed at random moments while enabled persistent bitmaps are tracked:
    /// before its first write (bitmaps untouched), while they are marked in use on disk,
    /// during the commands (in use), and while they are written back at the end.
    ///
    /// After every kill: `qemu-img check` finds no corruption; every enabled bitmap is
    /// either flagged in-use (then `qimg bitmap --remove` must drop it, the image must stay
    /// free of corruption, and it is added again, empty) or consistent, holding every granule
    /// it held before plus those of the commands whose output line was printed, and no
    /// granule outside those and the command in flight; the disabled bitmap never changes.
    /// Runs that complete must leave the bitmaps exactly old ∪ written.
    ///
    /// A third of the runs are long (killed during the commands); the others are a few
    /// commands long, killed at a random moment of a duration measured on completed runs,
    /// half of them only after the last output line, i.e. during the final write-back.
    @Test(.requiresQEMU, arguments: BitmapCrashCase.all)
    func killedWriterKeepsBitmapsSound(_ c: BitmapCrashCase) throws {
        guard BitmapTests.nbdinfo != nil, BitmapTests.qemuNBD != nil else {
            throw TestFailure("nbdinfo/qemu-nbd not found (install libnbd-bin and qemu-utils)")
        }
        let dir = try Paths.newScratch("crash-\(c.name)")
        var keep = false
        defer { if !keep { try? FileManager.default.removeItem(atPath: dir) } }
        let enabled: [(name: String, granularity: UInt64)] = [("big", 65536), ("small", 512)]
        let setup: [[String]] = [
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", c.createOptions, "img.qcow2", String(c.size)],
            ["qemu-img", "bitmap", "--add", "-g", "65536", "img.qcow2", "off"],
            ["qemu-img", "bitmap", "--add", "-g", "65536", "img.qcow2", "big"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 1M 300k", "-c", "write -z 5M 64k", "-c", "write -P 0x32 9000 3000", "img.qcow2"],
            ["qemu-img", "bitmap", "--disable", "img.qcow2", "off"],
            ["qemu-img", "bitmap", "--add", "-g", "512", "img.qcow2", "small"],
        ]
        for cmd in setup { _ = try Self.tool(cmd, cwd: dir) }
        let offBefore = try BitmapTests.qemuExtents("img.qcow2", "off", dir)
        guard !offBefore.isEmpty else { throw TestFailure("setup: the disabled bitmap has no dirty bits") }
        var before: [String: GranuleSet] = [:]
        for b in enabled {
            before[b.name] = GranuleSet(granularity: b.granularity, size: c.size,
                                        extents: try BitmapTests.qemuExtents("img.qcow2", b.name, dir))
        }

        let seed = Self.baseSeed &+ c.seedOffset &* 1_000_003
        var rng = SeededRNG(state: seed)
        // Durations of completed runs of each kind (from locking, or from the last output line,
        // to the exit); the first run of each kind is not killed.
        var duration: [Double?] = [nil, nil, nil]
        var kills = 0, completed = 0, runs = 0, inUseKills = 0, consistentChanged = 0, atWriteBack = 0

        func fail(_ run: Int, _ commands: [CrashCommand], _ what: String) {
            keep = true
            let file = dir + "/commands-run\(run).txt"
            try? commands.map(\.description).joined(separator: "\n").write(toFile: file, atomically: true, encoding: .utf8)
            Issue.record("""
                \(c.name): run \(run), QIMG_CRASH_SEED=\(Self.baseSeed): \(what)
                    image and commands in \(dir) (kept with QIMG_KEEP_FIXTURES=1)
                """)
        }

        while kills < Self.bitmapKillsPerCase && runs < Self.bitmapMaxRunsPerCase {
            runs += 1
            // 0: long, killed during the commands (first 90% of the measured duration);
            // 1: short, killed from 30% of the duration to past its end;
            // 2: short, killed after its last output line, during the write-back.
            let pick = UInt64.random(in: 0..<20, using: &rng)
            let kind = pick < 7 ? 0 : pick < 12 ? 1 : 2
            let count = kind == 0 ? 150 : Int.random(in: 1...5, using: &rng)
            let commands = CrashCommand.list(count, size: c.size, granule: 512, clusterSize: c.clusterSize, rng: &rng)
            let outputBytes = kind == 2 ? commands.compactMap(\.outputLine).reduce(0) { $0 + $1.utf8.count + 1 } : 0
            let fraction = Double(UInt64.random(in: 0...1000, using: &rng)) / 1000
            let delay = duration[kind].map { $0 * [0.9 * fraction, 0.3 + 0.9 * fraction, 1.3 * fraction][kind] } ?? 30
            let r = try Self.runAndKill(["io"] + commands.flatMap { ["-c", $0.description] } + ["img.qcow2"],
                                        cwd: dir, after: delay, poll: 100, afterOutputBytes: outputBytes)
            if !r.killed && r.status != 0 {
                fail(runs, commands, "qimg io exited with \(r.status): \(r.stderr)")
                return
            }
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
            if !r.killed {
                duration[kind] = duration[kind].map { 0.7 * $0 + 0.3 * r.elapsed } ?? r.elapsed
            }
            let inFlight = r.killed && lines.count < printing.count ? printing[lines.count] : nil
            let when = r.killed
                ? "killed \(String(format: "%.2f", r.elapsed * 1000)) ms after \(kind == 2 ? "the last output line" : "locking"), \(lines.count) of \(printing.count) commands done, in flight: \(inFlight.map(\.description) ?? "none")"
                : "completed"

            if let problem = try Runner.qemuCheckProblem("img.qcow2", dir, leaksAllowed: true) {
                fail(runs, commands, "\(when): \(problem)")
                return
            }
            let listed = try Self.qemuBitmaps(dir)
            guard let off = listed["off"], off.flags.isEmpty else {
                fail(runs, commands, "\(when): disabled bitmap 'off' is \(listed["off"].map { "flagged \($0.flags)" } ?? "missing")")
                return
            }
            let offNow = try BitmapTests.qemuExtents("img.qcow2", "off", dir)
            if offNow != offBefore {
                fail(runs, commands, "\(when): disabled bitmap changed: \(offNow), was \(offBefore)")
                return
            }
            var anyInUse = false, anyChanged = false
            for b in enabled {
                guard let entry = listed[b.name], entry.granularity == b.granularity else {
                    fail(runs, commands, "\(when): bitmap \(b.name) missing or with another granularity: \(listed)")
                    return
                }
                let old = before[b.name]!
                if entry.flags == ["in-use", "auto"] {
                    if !r.killed {
                        fail(runs, commands, "\(when): bitmap \(b.name) left in use by a run that exited 0")
                        return
                    }
                    anyInUse = true
                    let rm = try Qimg.run(["bitmap", "--remove", "img.qcow2", b.name], cwd: dir)
                    guard rm.exitedNormally, rm.status == 0 else {
                        fail(runs, commands, "\(when): removing in-use bitmap \(b.name): \(rm.summary): \(rm.err)")
                        return
                    }
                    if let problem = try Runner.qemuCheckProblem("img.qcow2", dir, leaksAllowed: true) {
                        fail(runs, commands, "\(when): after removing in-use bitmap \(b.name): \(problem)")
                        return
                    }
                    if try Self.qemuBitmaps(dir)[b.name] != nil {
                        fail(runs, commands, "\(when): bitmap \(b.name) still listed after --remove")
                        return
                    }
                    let add = try Qimg.run(["bitmap", "--add", "-g", String(b.granularity), "img.qcow2", b.name], cwd: dir)
                    guard add.exitedNormally, add.status == 0 else {
                        fail(runs, commands, "\(when): re-adding bitmap \(b.name): \(add.summary): \(add.err)")
                        return
                    }
                    before[b.name] = GranuleSet(granularity: b.granularity, size: c.size)
                    continue
                }
                guard entry.flags == ["auto"] else {
                    fail(runs, commands, "\(when): enabled bitmap \(b.name) has flags \(entry.flags)")
                    return
                }
                var must = old
                for cmd in printing[0..<lines.count] { must.mark(cmd) }
                var may = must
                if let f = inFlight { may.mark(f) }
                let now = GranuleSet(granularity: b.granularity, size: c.size,
                                     extents: try BitmapTests.qemuExtents("img.qcow2", b.name, dir))
                if let g = must.firstOutside(now) {
                    fail(runs, commands, "\(when): consistent bitmap \(b.name) lacks the granule at \(g) (has \(now), needs \(must))")
                    return
                }
                if let g = now.firstOutside(may) {
                    fail(runs, commands, "\(when): consistent bitmap \(b.name) has the granule at \(g) dirty, written by no command")
                    return
                }
                if !r.killed && now != must {
                    fail(runs, commands, "\(when): bitmap \(b.name) is not exactly old ∪ written")
                    return
                }
                if now != old { anyChanged = true }
                before[b.name] = now
            }
            if r.killed {
                kills += 1
                if anyInUse { inUseKills += 1 }
                if anyChanged { consistentChanged += 1 }
                if inFlight == nil && lines.count == printing.count { atWriteBack += 1 }
            } else {
                completed += 1
            }
        }
        print("CrashTests \(c.name): \(kills) kills (\(inUseKills) left bitmaps in use, \(atWriteBack) after the last command, \(consistentChanged) with written-back bitmaps), \(completed) runs completed, QIMG_CRASH_SEED=\(Self.baseSeed)")
        #expect(kills >= Self.bitmapKillsPerCase, "\(c.name): only \(kills) of \(runs) runs were killed (\(completed) completed first)")

        // The image stays usable: a last run to completion leaves each bitmap exactly old ∪ written,
        // and qimg reads what QEMU exports.
        let commands = CrashCommand.list(20, size: c.size, granule: 512, clusterSize: c.clusterSize, rng: &rng)
        let r = try Qimg.run(["io"] + commands.flatMap { ["-c", $0.description] } + ["img.qcow2"], cwd: dir)
        guard r.exitedNormally, r.status == 0 else {
            fail(runs + 1, commands, "final run: \(r.summary): \(r.err)")
            return
        }
        if let problem = try Runner.qemuCheckProblem("img.qcow2", dir, leaksAllowed: true) {
            fail(runs + 1, commands, "after the final run: \(problem)")
            return
        }
        for b in enabled {
            var expected = before[b.name]!
            for cmd in commands { expected.mark(cmd) }
            let theirs = try BitmapTests.qemuExtents("img.qcow2", b.name, dir)
            #expect(GranuleSet(granularity: b.granularity, size: c.size, extents: theirs) == expected,
                    "\(c.name): after the final run, bitmap \(b.name) is not exactly old ∪ written")
            #expect(try BitmapTests.qimgExtents("img.qcow2", b.name, dir) == theirs, "\(c.name): qimg --dump of \(b.name) differs from QEMU's")
        }
        #expect(try BitmapTests.qemuExtents("img.qcow2", "off", dir) == offBefore, "\(c.name): disabled bitmap changed")
    }
}
