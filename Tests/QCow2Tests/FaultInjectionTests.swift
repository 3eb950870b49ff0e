import Foundation
import Synchronization
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif
@testable import QCow2

// Fault injection exists in debug builds only (QIMG_FAULT_INJECTION, Package.swift).
#if QIMG_FAULT_INJECTION
/// Fault injection below the library (`FaultInjector`, armed per test directory, so
/// the parallel test cases do not see each other's faults).
///
/// For each operation kind, a template directory is built with qemu-img/qemu-io. A dry
/// run (no faults) on a copy counts the writes, syncs and reads the operation does and
/// gives the "new" state; the template is the "old" state. Then, on a fresh copy each
/// time, the operation runs again with its Nth write or Nth sync failing, for a sample
/// of N (every N with QIMG_FAULTS_EXHAUSTIVE=1), in two modes:
///
/// * EIO: that one call fails, later calls succeed (a transient error);
/// * ENOSPC: that call and every later one of its kind fail (a full disk), a failing
///   write first writing its whole 4 KiB blocks before its middle;
///
/// and, for operations that copy (backup, convert, commit, rebase, copy-on-write), with
/// its Nth read failing once (EIO).
///
/// After each failure: the operation threw the injected error (naming the file, the call
/// and the errno); `qemu-img check` finds no corruption in any image of the directory
/// (leaks allowed); guest contents (`qemu-img convert -O raw`) read, 512-byte sector by
/// sector, their old or their new value (or, for the session that keeps going after
/// errors, a value its sequence of requests explains), and requests that completed
/// before the failure read their new value; files that must not change are byte for
/// byte the same; bitmaps are exact or marked in use; a backup target is absent or
/// complete; a convert or create target is absent or partial but consistent. Then the
/// operation is run again without faults: it must succeed and give the new state.
///
/// Images are small (4 KiB-64 KiB clusters, one scenario with 512-byte clusters to grow
/// the refcount table) and live on tmpfs when there is one: about 15-25 s in all on two
/// busy cores (QIMG_FAULTS_EXHAUSTIVE=1: about 70 s).
@Suite(.requiresQEMU) struct FaultInjectionTests {
    static let exhaustive = ProcessInfo.processInfo.environment["QIMG_FAULTS_EXHAUSTIVE"] == "1"
    static let keep = ProcessInfo.processInfo.environment["QIMG_KEEP_FIXTURES"] == "1"
    /// Fault points per scenario and mode (writes, syncs) when not exhaustive.
    static let writeSamples = 5
    static let syncSamples = 3
    static let readSamples = 4

    @Test(arguments: FaultScenario.all)
    func faultsLeaveImagesConsistent(_ s: FaultScenario) throws {
        let root = Harness.workRoot + "/faults-\(s.name)-\(UUID().uuidString.prefix(8))"
        defer {
            if !Self.keep { try? FileManager.default.removeItem(atPath: root) }
            Harness.removeWorkRootIfEmpty()
        }
        let template = root + "/template"
        try FileManager.default.createDirectory(atPath: template, withIntermediateDirectories: true)
        try Harness.runSetup(s.setup, in: template)
        let old = try Harness.capture(template, s)

        // Dry run: counts, and the new state.
        let dry = root + "/dry"
        try Harness.copyDirectory(template, dry)
        let counter = FaultInjector(FaultPlan(pathPrefix: dry + "/"))
        do { try counter.scope { try Harness.retryingLockRace { try s.operation(dry, Completed()) } } } catch {
            Issue.record("\(s.name): the operation fails without faults: \(error)")
            return
        }
        let writes = counter.writes, syncs = counter.syncs, reads = counter.reads
        let new = try Harness.capture(dry, s)
        try Harness.checkAll(dry, label: "\(s.name) (no faults)")
        if let extra = s.afterDryRun { try extra(template, dry) }

        var runs: [FaultRun] = []
        for mode in FaultMode.allCases {
            for n in Harness.points(writes, Self.exhaustive ? writes : Self.writeSamples, shifted: mode == .enospc) {
                runs.append(FaultRun(kind: .write, nth: n, mode: mode))
            }
            for n in Harness.points(syncs, Self.exhaustive ? syncs : Self.syncSamples, shifted: mode == .enospc) {
                runs.append(FaultRun(kind: .sync, nth: n, mode: mode))
            }
        }
        if s.readFaults {
            // Reads fail once (EIO): a bad sector of a source or a backing file.
            for n in Harness.points(reads, Self.exhaustive ? reads : Self.readSamples, shifted: false) {
                runs.append(FaultRun(kind: .read, nth: n, mode: .eio))
            }
        }
        var failures = 0
        for (k, run) in runs.enumerated() {
            let dir = root + "/run-\(k)"
            try Harness.copyDirectory(template, dir)
            let findings = Findings()
            try Harness.$findings.withValue(findings) {
                let total = run.kind == .write ? writes : run.kind == .sync ? syncs : reads
                try Harness.faultRun(s, run, dir: dir, total: total, old: old, new: new)
            }
            if findings.count > 0 { failures += 1 }
            if !Self.keep { try? FileManager.default.removeItem(atPath: dir) }
        }
        let w = runs.filter { $0.kind == .write }.count, y = runs.filter { $0.kind == .sync }.count, r = runs.count - w - y
        let complete = Harness.completeTargets.withLock { $0[s.name] }.map { "; \($0) left a complete target" } ?? ""
        let readPart = s.readFaults ? ", \(reads) reads" : ""
        let readRuns = s.readFaults ? ", \(r) reads" : ""
        print("FaultInjection: \(s.name): \(writes) writes, \(syncs) syncs\(readPart); \(runs.count) faults injected (\(w) writes, \(y) syncs\(readRuns)), \(failures) with findings\(complete)")
    }

    /// Regression (found by this suite): when the frees after a bitmap directory switch
    /// failed, the image object still named the old directory, whose cluster the allocator
    /// already counted as free; a library user going on writing in the same session reused
    /// that cluster and freed it once more (a used cluster with refcount 0). The directory
    /// is now switched in memory before the frees. Every sync and write of the first
    /// request is failed once; the session then goes on writing and closes.
    @Test func continuingAfterAFailedBitmapDirectorySwitch() throws {
        let root = Harness.workRoot + "/faults-bitmapdir-\(UUID().uuidString.prefix(8))"
        defer {
            try? FileManager.default.removeItem(atPath: root)
            Harness.removeWorkRootIfEmpty()
        }
        let template = root + "/template"
        try FileManager.default.createDirectory(atPath: template, withIntermediateDirectories: true)
        try Harness.runSetup([
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M"],
            ["qemu-img", "bitmap", "--add", "img.qcow2", "b0"],
        ], in: template)
        var corrupted: [String] = []
        for kind in [FaultRun.Kind.write, .sync] {
            for n in 1...8 {
                let dir = root + "/\(kind.rawValue)-\(n)"
                try Harness.copyDirectory(template, dir)
                var plan = FaultPlan(pathPrefix: dir + "/")
                let failure = FaultPlan.Failure(nth: n, errno: EIO)
                if kind == .write { plan.failWrite = failure } else { plan.failSync = failure }
                try Harness.retryingLockRace {
                    var opener = ImageOpener()
                    opener.writable = true
                    let q = try #require(try opener.open(dir + "/img.qcow2") as? QCow2Image)
                    let first = Result { try FaultInjector(plan).scope { try q.write([UInt8](repeating: 1, count: 4096), at: 0) } }
                    guard case .failure = first else { return }
                    try q.write([UInt8](repeating: 2, count: 4096), at: 65536)
                    try q.close()
                }
                let r = try Runner.qemuImg(["check", "img.qcow2"], cwd: dir)
                if r.status == 2 { corrupted.append("\(kind.rawValue) \(n)") }
            }
        }
        #expect(corrupted.isEmpty, "qemu-img check finds corruption after failing (once, EIO): \(corrupted.joined(separator: ", "))")
    }

    /// Short reads (1..4095 bytes per pread) and interrupted system calls change nothing:
    /// the guest content of every qcow2 fixture, its bitmaps and the result of `check`
    /// are identical to those read without faults.
    @Test func shortReadsGiveIdenticalResults() throws {
        let f = try Fixtures.get()
        let dir = try Paths.newScratch("faults-shortreads")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // Hard links: the same bytes under a path only this test injects into.
        for name in try FileManager.default.contentsOfDirectory(atPath: f.validDir) where !name.hasPrefix(".") {
            try FileManager.default.linkItem(atPath: f.validDir + "/" + name, toPath: dir + "/" + name)
        }
        let injector = FaultInjector(FaultPlan(pathPrefix: dir + "/", shortReads: 1...4095, interrupt: true))
        var images = 0
        injector.scope {
            for entry in f.manifest where entry.format == "qcow2" {
                do {
                    let plain = try ImageOpener().open(f.validDir + "/" + entry.name, format: .qcow2)
                    let short = try ImageOpener().open(dir + "/" + entry.name, format: .qcow2)
                    try Self.expectSameContent(plain, short, label: entry.name)
                    let a = try Self.checkAndBitmaps(try #require(plain as? QCow2Image))
                    let b = try Self.checkAndBitmaps(try #require(short as? QCow2Image))
                    #expect(a == b, "\(entry.name): check or bitmaps differ with short reads:\n\(b)\nvs\n\(a)")
                    images += 1
                } catch {
                    Issue.record("\(entry.name): \(error)")
                }
            }
        }
        #expect(injector.reads > 0)
        #expect(images >= 30)
    }

    static func expectSameContent(_ a: any DiskImage, _ b: any DiskImage, label: String) throws {
        #expect(a.virtualSize == b.virtualSize)
        var x = [UInt8](repeating: 0, count: 1 << 20), y = x
        var pos: UInt64 = 0
        while pos < a.virtualSize {
            let n = Int(min(UInt64(x.count), a.virtualSize - pos))
            try x.withUnsafeMutableBytes { try a.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: pos) }
            try y.withUnsafeMutableBytes { try b.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: pos) }
            let same = x.withUnsafeBytes { p in y.withUnsafeBytes { q in memcmp(p.baseAddress!, q.baseAddress!, n) == 0 } }
            if !same {
                Issue.record("\(label): guest content at \(pos)+\(n) differs with short reads")
                return
            }
            pos += UInt64(n)
        }
    }

    /// check's result and report, and the consistent bitmaps' extents, as text.
    static func checkAndBitmaps(_ q: QCow2Image) throws -> String {
        var lines: [String] = []
        let r = try CheckOperation.run(q, report: { lines.append($0) })
        lines.append("\(r.exitCode) \(r.corruptions) \(r.leaks) \(r.allocatedClusters) \(r.fragmentedClusters) \(r.compressedClusters) \(r.imageEndOffset)")
        for e in q.bitmaps where !e.inUse {
            var extents: [String] = []
            try q.loadBitmap(e).forEachDirtyExtent { extents.append("\($0)+\($1)") }
            lines.append("\(e.name): \(extents.joined(separator: " "))")
        }
        return lines.joined(separator: "\n")
    }

    /// Short writes (1..4095 bytes per pwrite), short reads and interrupted system calls
    /// change nothing: the same workload gives byte-identical files.
    @Test func shortWritesGiveIdenticalFiles() throws {
        let root = Harness.workRoot + "/faults-shortwrites-\(UUID().uuidString.prefix(8))"
        defer {
            try? FileManager.default.removeItem(atPath: root)
            Harness.removeWorkRootIfEmpty()
        }
        for s in FaultScenario.all where ["write-4k-bitmaps", "zero-discard", "backup-incremental", "commit"].contains(s.name) {
            let a = root + "/\(s.name)-plain", b = root + "/\(s.name)-short"
            try FileManager.default.createDirectory(atPath: a, withIntermediateDirectories: true)
            try Harness.runSetup(s.setup, in: a)
            try Harness.copyDirectory(a, b)
            try s.operation(a, Completed())
            let injector = FaultInjector(FaultPlan(pathPrefix: b + "/", shortReads: 1...4095, shortWrites: 1...4095, interrupt: true))
            do { try injector.scope { try s.operation(b, Completed()) } } catch {
                Issue.record("\(s.name): with short writes: \(error)")
                continue
            }
            #expect(injector.writes > 0)
            for name in try FileManager.default.contentsOfDirectory(atPath: a).sorted() {
                let x = try Data(contentsOf: URL(fileURLWithPath: a + "/" + name))
                let y = try? Data(contentsOf: URL(fileURLWithPath: b + "/" + name))
                #expect(x == y, "\(s.name): \(name) differs with short writes")
            }
        }
    }

    @Test func planSpecificationParses() throws {
        let p = try FaultPlan(specification: "write:5:ENOSPC:sticky:partial,sync:2,short-reads:1-7,short-writes:9,eintr,prefix:/tmp/a:b/")
        #expect(p.failWrite == FaultPlan.Failure(nth: 5, errno: ENOSPC, sticky: true, partial: true))
        #expect(p.failSync == FaultPlan.Failure(nth: 2, errno: EIO))
        #expect(p.shortReads == 1...7)
        #expect(p.shortWrites == 9...9)
        #expect(p.interrupt)
        #expect(p.pathPrefix == "/tmp/a:b/")
        for bad in ["write", "write:0", "write:1:EWHAT", "short-reads:5-2", "bogus"] {
            #expect(throws: QCow2Error.self) { try FaultPlan(specification: bad) }
        }
    }
}

// MARK: - Scenarios

/// Guest requests that completed (their range must read the new value afterwards).
final class Completed: Sendable {
    private let list = Mutex<[(file: String, offset: UInt64, length: UInt64)]>([])
    private let requests = Mutex<[ModelRequest]>([])
    func add(_ file: String, _ offset: UInt64, _ length: UInt64) { list.withLock { $0.append((file, offset, length)) } }
    var all: [(file: String, offset: UInt64, length: UInt64)] { list.withLock { $0 } }
    /// Every request tried, in order, with its outcome (for `FaultScenario.model`).
    func attempt(_ r: ModelRequest) { requests.withLock { $0.append(r) } }
    var attempts: [ModelRequest] { requests.withLock { $0 } }
}

/// Issues recorded during one fault run.
final class Findings: Sendable {
    private let n = Atomic<Int>(0)
    func add() { n.add(1, ordering: .relaxed) }
    var count: Int { n.load(ordering: .relaxed) }
}

/// A sector-aligned guest request that fills its range with one byte value (zero writes
/// and aligned discards: 0), and whether it succeeded.
struct ModelRequest: Sendable {
    var offset: UInt64
    var length: UInt64
    var fill: UInt8
    var ok: Bool
}

struct View: Sendable {
    enum Rule: Sendable {
        /// Must exist; every sector reads its old or its new value.
        case oldOrNew
        /// Absent, or exactly the new content (a backup target).
        case absentOrNew
        /// Absent, or every sector reads zeros or its new value (a convert target).
        case partial
        /// The file's bytes do not change (a backing file, a read-only source).
        case unchangedFile
    }
    var file: String
    var snapshot: String? = nil
    var rule: Rule = .oldOrNew
    var label: String { snapshot.map { "\(file)@\($0)" } ?? file }
}

enum BitmapRule: Sendable {
    /// Enabled bitmaps tracking guest writes: in use, or between old and new and
    /// covering every changed granule; disabled ones unchanged.
    case tracking
    /// The whole set of bitmaps is the old one or the new one.
    case atomic
    /// Each bitmap is in use, or equal to its old or its new version.
    case exactOrInUse
    /// Bits cleared in place after a backup: the old set or the new one, or the old names
    /// with each bitmap's bits between its new and its old bits (a mix of the two).
    case lowered
}

enum RetryRule: Sendable { case always, ifUnchanged }

struct FaultScenario: Sendable, CustomTestStringConvertible {
    var name: String
    /// Commands run in the template directory (first word: qemu-img or qemu-io).
    var setup: [[String]]
    var operation: @Sendable (String, Completed) throws -> Void
    /// Also fail reads (once, EIO): for operations that copy or copy on write.
    var readFaults = false
    var views: [View]
    var bitmaps: [(file: String, rule: BitmapRule)] = []
    var retry: RetryRule = .always
    /// A backup target: absent after a failure, or complete (then the source's bitmap may
    /// have changed).
    var backupTarget: String? = nil
    var afterDryRun: (@Sendable (String, String) throws -> Void)? = nil
    /// What a user does before retrying (e.g. remove the bitmaps a failure left in use).
    var recover: (@Sendable (String) throws -> Void)? = nil
    /// The view checked against the request model (`Completed.attempt`) instead of old/new:
    /// every sector reads the value of the last request on it that succeeded (or its old
    /// value), or the value of a failed request after that one.
    var model: String? = nil
    var testDescription: String { name }

    /// `qimg bitmap --remove` of every bitmap marked in use: resize refuses them.
    static func removeBitmapsInUse(_ dir: String) throws {
        var opener = ImageOpener()
        opener.writable = true
        let q = try #require(try opener.open(path(dir, "img.qcow2")) as? QCow2Image)
        for e in q.bitmaps where e.inUse { try q.applyBitmapActions([.remove], to: e.name) }
    }

    static func path(_ dir: String, _ file: String) -> String { dir + "/" + file }

    /// Opens `file` for writing, runs `body`, and ends the session like `qimg io`:
    /// close() even after a failure, the first error reported.
    static func session(_ dir: String, _ file: String, _ body: (QCow2Image) throws -> Void) throws {
        var opener = ImageOpener()
        opener.writable = true
        let image = try #require(try opener.open(path(dir, file)) as? QCow2Image)
        var failure: Error?
        do { try body(image) } catch { failure = error }
        do { try image.close() } catch { if failure == nil { failure = error } }
        if let failure { throw failure }
    }

    static func write(_ q: QCow2Image, _ done: Completed, _ offset: UInt64, _ length: Int, _ pattern: UInt8) throws {
        try q.write([UInt8](repeating: pattern, count: length), at: offset)
        done.add(q.path, offset, UInt64(length))
    }

    static func bitmapScenario(_ name: String, setup: [[String]], _ actions: [BitmapAction], to bitmap: String) -> FaultScenario {
        FaultScenario(name: name, setup: setup, operation: { dir, _ in
            var opener = ImageOpener()
            opener.writable = true
            opener.openBacking = false
            let q = try #require(try opener.open(path(dir, "img.qcow2")) as? QCow2Image)
            try q.applyBitmapActions(actions, to: bitmap)
        }, views: [View(file: "img.qcow2")], bitmaps: [("img.qcow2", .atomic)], retry: .ifUnchanged)
    }

    static let all: [FaultScenario] = [
        // In-place partial writes, copy-on-write of a fresh partial cluster, a write
        // crossing into a new L2 table; an enabled and a disabled bitmap.
        FaultScenario(name: "write-4k-bitmaps", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "img.qcow2", "8M"],
            ["qemu-img", "bitmap", "--add", "img.qcow2", "b0"],
            ["qemu-img", "bitmap", "--add", "--disable", "img.qcow2", "off"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x12 3M 64k", "img.qcow2"],
        ], operation: { dir, done in
            try session(dir, "img.qcow2") { q in
                try write(q, done, 4096 + 1000, 10000, 0xA1)
                try write(q, done, (1 << 20) + 512, 8192, 0xA2)
                try write(q, done, (2 << 20) - 4096 + 100, 10000, 0xA3)
                try write(q, done, (3 << 20) + 100, 100, 0xA4)
            }
        }, views: [View(file: "img.qcow2")], bitmaps: [("img.qcow2", .tracking)]),

        // A library user that keeps going after a failed request: later requests (that
        // succeed once the failure was transient) overlap the failed one, in L2 tables
        // shared with a snapshot, a new L2 table and zeroed clusters; an enabled bitmap.
        FaultScenario(name: "keep-going-after-failures", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "img.qcow2", "8M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x15 0 1M", "img.qcow2"],
            ["qemu-img", "snapshot", "-c", "s1", "img.qcow2"],
        ], operation: { dir, done in
            var opener = ImageOpener()
            opener.writable = true
            let q = try #require(try opener.open(path(dir, "img.qcow2")) as? QCow2Image)
            var first: Error?
            func attempt(_ offset: UInt64, _ length: UInt64, _ fill: UInt8, zero: Bool = false, discard: Bool = false) {
                let result = Result<Void, any Error> {
                    if discard {
                        try q.discard(at: offset, length: length)
                    } else if zero {
                        try q.writeZeroes(at: offset, length: length, unmap: fill == 1)
                    } else {
                        try q.write([UInt8](repeating: fill, count: Int(length)), at: offset)
                    }
                }
                if case .failure(let e) = result, first == nil { first = e }
                let ok = if case .success = result { true } else { false }
                done.attempt(ModelRequest(offset: offset, length: length, fill: zero || discard ? 0 : fill, ok: ok))
            }
            attempt((2 << 20) - 4096, 8192, 0xE1)          // crosses into a new L2 table
            attempt(100 << 10, 12 << 10, 0xE2)             // L2 table and clusters shared with s1
            attempt(102 << 10, 6 << 10, 0xE3)              // overlaps the previous one
            attempt((2 << 20) + 8192, 4096, 0xE4)          // the new L2 table again
            attempt(512 << 10, 64 << 10, 1, zero: true)    // zero with unmap (shared clusters)
            attempt((2 << 20) - 10240, 20480, 0xE5)        // overlaps the first and the fourth
            attempt(520 << 10, 8 << 10, 0xE6)              // into the zeroed range
            attempt(64 << 10, 64 << 10, 0, discard: true)  // discard over written and shared clusters
            attempt(3 << 20, 4096, 0xE7)
            var failure = first
            do { try q.close() } catch { if failure == nil { failure = error } }
            if let failure { throw failure }
        }, views: [View(file: "img.qcow2"), View(file: "img.qcow2", snapshot: "s1")], model: "img.qcow2"),

        // 512-byte clusters and 64-bit refcounts: the write needs new refcount blocks
        // and a larger refcount table (moved: blocks, table, header switch, old freed).
        FaultScenario(name: "write-refcount-table-growth", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", "img.qcow2", "8M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x21 0 1976k", "img.qcow2"],
        ], operation: { dir, done in
            try session(dir, "img.qcow2") { q in
                try write(q, done, 4 << 20, 16384, 0xB1)
            }
        }, views: [View(file: "img.qcow2")], afterDryRun: { template, dry in
            let before = try Harness.header(template + "/img.qcow2")
            let after = try Harness.header(dry + "/img.qcow2")
            #expect(before.refcountTableOffset != after.refcountTableOffset,
                    "write-refcount-table-growth: the refcount table did not move; adjust the prefill")
        }),

        // Writes to clusters and an L2 table shared with an internal snapshot.
        FaultScenario(name: "write-snapshot-cow", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 512k", "img.qcow2"],
            ["qemu-img", "snapshot", "-c", "s1", "img.qcow2"],
        ], operation: { dir, done in
            try session(dir, "img.qcow2") { q in
                try write(q, done, 100_000, 70000, 0xC1)
                try write(q, done, 384 << 10, 64 << 10, 0xC2)
            }
        }, readFaults: true, views: [View(file: "img.qcow2"), View(file: "img.qcow2", snapshot: "s1")]),

        // Extended L2 overlay: subcluster writes, copy-on-write from the backing file.
        FaultScenario(name: "write-xl2-overlay", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 0 1M", "base.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=32768", "-b", "base.qcow2", "-F", "qcow2", "img.qcow2"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 40k 8k", "img.qcow2"],
        ], operation: { dir, done in
            try session(dir, "img.qcow2") { q in
                try write(q, done, 33000, 3000, 0xD1)
                try write(q, done, 200_000, 5000, 0xD2)
                try q.writeZeroes(at: 65536 + 1024, length: 4096)
                done.add(q.path, 65536 + 1024, 4096)
            }
        }, readFaults: true, views: [View(file: "img.qcow2"), View(file: "base.qcow2", rule: .unchangedFile)]),

        // Zero writes (zero flag, unmap), partial-cluster zeroing, discard; a bitmap.
        FaultScenario(name: "zero-discard", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "8M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x51 0 4M", "img.qcow2"],
            ["qemu-img", "bitmap", "--add", "img.qcow2", "b0"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x52 6M 64k", "img.qcow2"],
        ], operation: { dir, done in
            try session(dir, "img.qcow2") { q in
                try q.writeZeroes(at: 512 << 10, length: 256 << 10)
                done.add(q.path, 512 << 10, 256 << 10)
                try q.writeZeroes(at: (1 << 20) + 4096, length: 200 << 10, unmap: true)
                done.add(q.path, (1 << 20) + 4096, 200 << 10)
                try q.discard(at: 2 << 20, length: 1 << 20)
                try q.writeZeroes(at: 7 << 20, length: 128 << 10)
                done.add(q.path, 7 << 20, 128 << 10)
            }
        }, views: [View(file: "img.qcow2")], bitmaps: [("img.qcow2", .tracking)]),

        // Bitmap actions: each a new set of bitmaps switched to at once.
        bitmapScenario("bitmap-add-first", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", "img.qcow2"],
        ], [.add(granularity: nil, disabled: false)], to: "new"),
        bitmapScenario("bitmap-add-second", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M"],
            ["qemu-img", "bitmap", "--add", "img.qcow2", "b0"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x62 0 1M", "img.qcow2"],
        ], [.add(granularity: 4096, disabled: true)], to: "b1"),
        bitmapScenario("bitmap-merge", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M"],
            ["qemu-img", "bitmap", "--add", "img.qcow2", "b0"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x63 0 256k", "img.qcow2"],
            ["qemu-img", "bitmap", "--add", "img.qcow2", "b1"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x64 1M 128k", "img.qcow2"],
        ], [.clear, .merge(source: "b1")], to: "b0"),
        bitmapScenario("bitmap-remove-last", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M"],
            ["qemu-img", "bitmap", "--add", "img.qcow2", "b0"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x65 0 256k", "img.qcow2"],
        ], [.remove], to: "b0"),

        // Full backup with a bitmap (cleared once the target is in place).
        FaultScenario(name: "backup-full", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "8M"],
            ["qemu-img", "bitmap", "--add", "img.qcow2", "b"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x71 0 1M", "-c", "write -P 0x72 5M 192k", "-c", "write -z 2M 64k", "img.qcow2"],
        ], operation: { dir, _ in
            var o = BackupOptions()
            o.sync = .full
            o.bitmap = "b"
            _ = try BackupOperation.run(source: path(dir, "img.qcow2"), target: path(dir, "full.qcow2"), options: o)
        }, readFaults: true, views: [View(file: "img.qcow2"), View(file: "full.qcow2", rule: .absentOrNew)],
        bitmaps: [("img.qcow2", .lowered)], backupTarget: "full.qcow2"),

        // Incremental backup: the bitmap's clusters on top of the previous backup.
        FaultScenario(name: "backup-incremental", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "8M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x73 0 2M", "img.qcow2"],
            ["qemu-img", "convert", "-O", "qcow2", "img.qcow2", "full.qcow2"],
            ["qemu-img", "bitmap", "--add", "img.qcow2", "b"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x74 1M 256k", "-c", "write -P 0x75 5M 64k", "-c", "write -z 0 64k", "img.qcow2"],
        ], operation: { dir, _ in
            var o = BackupOptions()
            o.sync = .incremental
            o.bitmap = "b"
            o.backingFile = "full.qcow2"
            o.backingFormat = .qcow2
            _ = try BackupOperation.run(source: path(dir, "img.qcow2"), target: path(dir, "inc.qcow2"), options: o)
        }, readFaults: true, views: [View(file: "img.qcow2"), View(file: "full.qcow2", rule: .unchangedFile), View(file: "inc.qcow2", rule: .absentOrNew)],
        bitmaps: [("img.qcow2", .lowered)], backupTarget: "inc.qcow2"),

        // Convert with bitmaps into a new image (written without barriers, fsynced at the end).
        FaultScenario(name: "convert-bitmaps", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "8M"],
            ["qemu-img", "bitmap", "--add", "img.qcow2", "b0"],
            ["qemu-img", "bitmap", "--add", "--disable", "img.qcow2", "b1"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x81 0 1M", "-c", "write -P 0x82 6M 128k", "img.qcow2"],
        ], operation: { dir, _ in
            let src = try ImageOpener().open(path(dir, "img.qcow2"))
            var o = ConvertOptions()
            o.create.clusterSize = 16384
            o.copyBitmaps = true
            try ConvertOperation.run(source: src, target: path(dir, "out.qcow2"), options: o)
        }, readFaults: true, views: [View(file: "img.qcow2", rule: .unchangedFile), View(file: "out.qcow2", rule: .partial)]),

        // Convert with compression (compressed clusters packed into shared host clusters).
        FaultScenario(name: "convert-compressed", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "4M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x83 0 256k", "-c", "write -P 0x84 1M 64k", "img.qcow2"],
        ], operation: { dir, _ in
            let src = try ImageOpener().open(path(dir, "img.qcow2"))
            var o = ConvertOptions()
            o.create.clusterSize = 4096
            o.compressed = true
            try ConvertOperation.run(source: src, target: path(dir, "out.qcow2"), options: o)
        }, views: [View(file: "img.qcow2", rule: .unchangedFile), View(file: "out.qcow2", rule: .partial)]),

        // Commit into the base, then empty the top: the top's guest view never changes.
        FaultScenario(name: "commit", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "base.qcow2", "8M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x91 0 2M", "base.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x92 1M 256k", "-c", "write -z 1536k 64k", "-c", "write -P 0x93 6M 128k", "top.qcow2"],
        ], operation: { dir, _ in
            try CommitOperation.run(path(dir, "top.qcow2"), options: CommitOptions())
        }, readFaults: true, views: [View(file: "top.qcow2"), View(file: "base.qcow2")]),

        // Safe rebase: the differences copied into the image, then the header switched.
        FaultScenario(name: "rebase", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "base1.qcow2", "4M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0xa1 0 2M", "base1.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "base2.qcow2", "4M"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0xa2 1M 2M", "base2.qcow2"],
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base1.qcow2", "-F", "qcow2", "img.qcow2"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0xa3 512k 64k", "img.qcow2"],
        ], operation: { dir, _ in
            var o = RebaseOptions()
            o.backing = "base2.qcow2"
            o.backingFormat = .qcow2
            try RebaseOperation.run(path(dir, "img.qcow2"), options: o)
        }, readFaults: true, views: [View(file: "img.qcow2"), View(file: "base1.qcow2", rule: .unchangedFile), View(file: "base2.qcow2", rule: .unchangedFile)]),

        // Growing: a larger L1 table; bitmaps marked in use, resized, then consistent again.
        FaultScenario(name: "resize-grow", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "img.qcow2", "8M"],
            ["qemu-img", "bitmap", "--add", "img.qcow2", "b0"],
            ["qemu-img", "bitmap", "--add", "--disable", "-g", "4096", "img.qcow2", "b1"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0xb1 0 1M", "-c", "write -P 0xb2 7M 64k", "img.qcow2"],
        ], operation: { dir, _ in
            try session(dir, "img.qcow2") { q in try q.resize(to: 64 << 20, allowShrink: false) }
        }, views: [View(file: "img.qcow2")], bitmaps: [("img.qcow2", .exactOrInUse)], recover: removeBitmapsInUse),

        // Shrinking: the tail discarded and dropped, bitmaps cut to the new size.
        FaultScenario(name: "resize-shrink", setup: [
            ["qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", "8M"],
            ["qemu-img", "bitmap", "--add", "img.qcow2", "b0"],
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0xc1 0 2M", "-c", "write -P 0xc2 5M 2M", "img.qcow2"],
        ], operation: { dir, _ in
            try session(dir, "img.qcow2") { q in try q.resize(to: (2 << 20) + (512 << 10), allowShrink: true) }
        }, views: [View(file: "img.qcow2")], bitmaps: [("img.qcow2", .exactOrInUse)], recover: removeBitmapsInUse),

        // Create with metadata preallocation (L2 tables for the whole disk).
        FaultScenario(name: "create", setup: [], operation: { dir, _ in
            var o = CreateOptions()
            o.size = 16 << 20
            o.clusterSize = 4096
            o.preallocation = .metadata
            try ImageCreator.create(path(dir, "new.qcow2"), options: o)
        }, views: [View(file: "new.qcow2", rule: .partial)]),
    ]
}

// MARK: - The harness

enum FaultMode: CaseIterable, CustomStringConvertible {
    case eio, enospc
    var errno: Int32 { self == .eio ? EIO : ENOSPC }
    var description: String { self == .eio ? "EIO once" : "ENOSPC from then on" }
}

struct FaultRun {
    enum Kind: String { case write, sync, read }
    var kind: Kind
    var nth: Int
    var mode: FaultMode

    var plan: FaultPlan.Failure {
        FaultPlan.Failure(nth: nth, errno: mode.errno, sticky: mode == .enospc, partial: mode == .enospc && kind == .write)
    }
}

struct BitmapState: Equatable {
    var inUse: Bool
    var auto: Bool
    var granularity: UInt64
    var bits: Set<UInt64>
}

struct ImageState {
    var content: Data
    var bitmaps: [String: BitmapState]?
}

/// Guest contents by view label (nil: the file does not exist).
typealias DirState = [String: ImageState?]

enum Harness {
    /// Where the scenarios run: tmpfs when there is one (the library's many syncs cost
    /// nothing there; the faults are simulated anyway), else the test work area.
    /// QIMG_FAULTS_DIR overrides.
    static let workRoot: String = {
        if let d = ProcessInfo.processInfo.environment["QIMG_FAULTS_DIR"], !d.isEmpty { return d }
        let mounts = (try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? ""
        let tmpfs = mounts.split(separator: "\n").contains { $0.split(separator: " ").dropFirst().prefix(2) == ["/dev/shm", "tmpfs"] }
        if tmpfs && access("/dev/shm", W_OK) == 0 {
            return "/dev/shm/qimg-faults-\(getpid())"
        }
        return Paths.scratch
    }()

    /// Removes the per-process tmpfs directory once the last test using it is done.
    static func removeWorkRootIfEmpty() {
        if workRoot.hasPrefix("/dev/shm/qimg-faults-") { rmdir(workRoot) }
    }

    /// Issues recorded by the harness (to count the runs with findings).
    @TaskLocal static var findings: Findings?
    /// Backup runs whose failure left a complete target, per scenario.
    static let completeTargets = Mutex<[String: Int]>([:])

    static func issue(_ message: String, sourceLocation: SourceLocation = #_sourceLocation) {
        findings?.add()
        Issue.record(Comment(rawValue: message), sourceLocation: sourceLocation)
    }

    static func runSetup(_ commands: [[String]], in dir: String) throws {
        for c in commands { try Runner.qemuStep(c, in: dir) }
    }

    static func copyDirectory(_ from: String, _ to: String) throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: to, withIntermediateDirectories: true)
        for name in try fm.contentsOfDirectory(atPath: from) {
            try fm.copyItem(atPath: from + "/" + name, toPath: to + "/" + name)
        }
    }

    static func header(_ path: String) throws -> Header {
        try QCow2Image(path: path, file: try BlockFile(path: path)).header
    }

    static func exists(_ path: String) -> Bool { FileManager.default.fileExists(atPath: path) }
    /// The temporary files of runs writing `target` in `dir` (TARGET.PID-TOKEN.qimg-tmp).
    static func temporaryFiles(_ dir: String, of target: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter {
            $0.hasPrefix(target + ".") && $0.hasSuffix(StagedFile.temporarySuffix)
        }
    }

    /// N values to fail at: all of 1...total when few, else `count` spread over them
    /// (the first and the last included; `shifted` takes the points in between).
    static func points(_ total: Int, _ count: Int, shifted: Bool) -> [Int] {
        guard total > 0 else { return [] }
        if total <= count { return Array(1...total) }
        var out: Set<Int> = [1, total]
        let steps = max(1, count - 1)
        for i in 0..<steps {
            let x = shifted ? (2 * i + 1) * (total - 1) / (2 * steps) : i * (total - 1) / steps
            out.insert(1 + x)
        }
        return out.sorted()
    }

    /// Guest contents of the views (qemu-img convert -O raw) and the bitmaps.
    static func capture(_ dir: String, _ s: FaultScenario) throws -> DirState {
        var state: DirState = [:]
        for v in s.views {
            guard exists(dir + "/" + v.file) else { state[v.label] = .some(nil); continue }
            if v.rule == .unchangedFile {
                state[v.label] = ImageState(content: try Data(contentsOf: URL(fileURLWithPath: dir + "/" + v.file)), bitmaps: nil)
                continue
            }
            let raw = dir + "/.\(v.label.replacingOccurrences(of: "@", with: "_")).raw"
            var args = ["convert", "-U"]
            if let snap = v.snapshot { args += ["-l", "snapshot.name=\(snap)"] }
            args += ["-O", "raw", v.file, raw]
            let r = try Runner.qemuImg(args, cwd: dir)
            guard r.exitedNormally, r.status == 0 else {
                throw TestFailure("qemu-img convert of \(v.label) in \(dir) failed: \(r.err)")
            }
            let data = try Data(contentsOf: URL(fileURLWithPath: raw))
            try? FileManager.default.removeItem(atPath: raw)
            var bitmaps: [String: BitmapState]?
            if v.snapshot == nil, s.bitmaps.contains(where: { $0.file == v.file }) {
                bitmaps = try readBitmaps(dir + "/" + v.file)
            }
            state[v.label] = ImageState(content: data, bitmaps: bitmaps)
        }
        return state
    }

    static func readBitmaps(_ path: String) throws -> [String: BitmapState] {
        let q = try QCow2Image(path: path, file: try BlockFile(path: path))
        var out: [String: BitmapState] = [:]
        for e in q.bitmaps {
            var bits = Set<UInt64>()
            if !e.inUse {
                try q.loadBitmap(e).forEachDirtyExtent { start, length in
                    for g in (start / e.granularity)...((start + length - 1) / e.granularity) { bits.insert(g) }
                }
            }
            out[e.name] = BitmapState(inUse: e.inUse, auto: e.isAuto, granularity: e.granularity, bits: bits)
        }
        return out
    }

    /// qemu-img check on every qcow2 file of `dir`: no corruption (leaks allowed).
    static func checkAll(_ dir: String, label: String, skip: Set<String> = []) throws {
        for name in try FileManager.default.contentsOfDirectory(atPath: dir).sorted() where name.hasSuffix(".qcow2") && !skip.contains(name) {
            if let problem = try Runner.qemuCheckProblem(name, dir, leaksAllowed: true, forceShare: true) {
                issue("\(label): \(problem)")
            }
        }
    }

    /// Runs `body`, again when it failed only because an image was "in use by another
    /// process": a test artifact. Tests run in parallel threads of one process, and a child
    /// another thread is spawning inherits (until it execs) a copy of our descriptors, so
    /// the open file description of an image closed a moment ago, and its OFD lock, can
    /// outlive the close. No deadline (a loaded machine can keep such a child from exec'ing
    /// for long): it retries while a child of ours has not exec'd yet, and at least 50 times
    /// 10 ms apart (other threads keep spawning children, and one can fork between our look
    /// at /proc and the next attempt); an image still in use after that is in use for real.
    static func retryingLockRace(_ body: () throws -> Void) throws {
        var attempts = 0
        while true {
            do { return try body() } catch QCow2Error.inUse where attempts < 50 || childBeforeExec() {
                attempts += 1
                usleep(10_000)
            }
        }
    }

    /// Whether a child of this process is still a copy of it (spawned, not exec'd yet). A
    /// child that runs this test binary again (WriteMemoryTests') counts too: it only
    /// delays the verdict on a real "in use".
    static func childBeforeExec() -> Bool {
        let me = getpid()
        guard let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"),
              let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return false }
        for pid in entries.compactMap({ Int32($0) }) where pid != me {
            // "PID (comm) S PPID ...": comm may hold spaces and parentheses, so from the last ')'.
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { continue }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count > 1, Int32(fields[1]) == me else { continue }
            if (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe")) == exe { return true }
        }
        return false
    }

    /// One fault: run, then every guarantee.
    static func faultRun(_ s: FaultScenario, _ run: FaultRun, dir: String, total: Int, old: DirState, new: DirState) throws {
        let label = "\(s.name): \(run.kind.rawValue) \(run.nth) of \(total) failing (\(run.mode))"
        var plan = FaultPlan(pathPrefix: dir + "/")
        switch run.kind {
        case .write: plan.failWrite = run.plan
        case .sync: plan.failSync = run.plan
        case .read: plan.failRead = run.plan
        }
        let injector = FaultInjector(plan)
        let done = Completed()
        var thrown: Error?
        do { try injector.scope { try s.operation(dir, done) } } catch { thrown = error }

        // 1. A clear error: the injected one, naming the file and the call.
        guard injector.injected > 0 else {
            issue("\(label): the fault was not reached (the dry run counted differently)")
            return
        }
        let calls = run.kind == .write ? ["write", "truncate"] : run.kind == .sync ? ["fdatasync", "fsync"] : ["read"]
        switch thrown {
        case nil:
            issue("\(label): the operation succeeded; the injected failure was swallowed")
        case let e as QCow2Error:
            // The injected error itself, or one that quotes it (rebase: "Could not open new
            // backing file 'NAME': PATH: read failed: ...").
            let text = e.description
            let errnoText = String(cString: strerror(run.mode.errno))
            let named = calls.contains { text.contains("\($0) failed: \(errnoText)") } && text.contains(dir + "/")
            if case .io(let p, let op, let errno) = e, !(p.hasPrefix(dir + "/") && calls.contains(op) && errno == run.mode.errno) {
                issue("\(label): not the injected error: \(text)")
            } else if !named {
                issue("\(label): the message does not name the file, the call and the error: \(text)")
            }
        case let e?:
            issue("\(label): not a QCow2Error: \(type(of: e)): \(e)")
        }

        // 2. The guarantees (files verified unchanged need no check).
        let unchanged = Set(s.views.filter { $0.rule == .unchangedFile }.map(\.file))
        let after: DirState
        do { after = try capture(dir, s) } catch {
            issue("\(label): cannot read the images: \(error)")
            return
        }
        verify(s, label: label, old: old, new: new, after: after, completed: done.all, attempts: done.attempts, dir: dir)
        try checkAll(dir, label: label, skip: unchanged)

        // 3. A retry without faults succeeds and gives the new state.
        if let t = s.backupTarget, exists(dir + "/" + t) {
            // The failure came after the rename: the backup is complete (verified above),
            // the bitmap unchanged or updated; a retry would need --force.
            completeTargets.withLock { $0[s.name, default: 0] += 1 }
            return
        }
        if s.retry == .ifUnchanged && !same(after, old) { return }
        do {
            try retryingLockRace {
                try s.recover?(dir)
                try s.operation(dir, Completed())
            }
        } catch {
            issue("\(label): the retry failed: \(error)")
            return
        }
        try checkAll(dir, label: label + ", after the retry", skip: unchanged)
        let final: DirState
        do { final = try capture(dir, s) } catch {
            issue("\(label), after the retry: cannot read the images: \(error)")
            return
        }
        verifyRetry(s, label: label + ", after the retry", old: old, new: new, after: after, final: final)
    }

    static func same(_ a: DirState, _ b: DirState) -> Bool {
        for (k, x) in a {
            let y = b[k] ?? nil
            guard let x else { if y != nil { return false }; continue }
            guard let y, x.content == y.content, x.bitmaps == y.bitmaps else { return false }
        }
        return true
    }

    static let sector = 512

    /// The first sector of `after` that is neither its old nor its new value (both
    /// padded with zeros), and the sectors that differ from old.
    static func sectorsOldOrNew(after: Data, old: Data, new: Data) -> (bad: Int?, changed: [Int]) {
        var changed: [Int] = []
        let zero = [UInt8](repeating: 0, count: sector)
        return after.withUnsafeBytes { a in
            old.withUnsafeBytes { o in
                new.withUnsafeBytes { n in
                    zero.withUnsafeBytes { z in
                        func at(_ p: UnsafeRawBufferPointer, _ i: Int) -> UnsafeRawPointer {
                            i * sector + sector <= p.count ? p.baseAddress! + i * sector : z.baseAddress!
                        }
                        for i in 0..<(a.count / sector) {
                            let s = a.baseAddress! + i * sector
                            let isOld = memcmp(s, at(o, i), sector) == 0
                            if !isOld { changed.append(i) }
                            if !isOld && memcmp(s, at(n, i), sector) != 0 { return (i, changed) }
                        }
                        return (nil, changed)
                    }
                }
            }
        }
    }

    static func verify(_ s: FaultScenario, label: String, old: DirState, new: DirState, after: DirState,
                       completed: [(file: String, offset: UInt64, length: UInt64)], attempts: [ModelRequest], dir: String) {
        var changedByFile: [String: [Int]] = [:]
        for v in s.views {
            let o = old[v.label] ?? nil, n = new[v.label] ?? nil, a = after[v.label] ?? nil
            guard let n else { issue("\(label): \(v.label) missing after the dry run"); continue }
            switch v.rule {
            case .oldOrNew:
                guard let a else { issue("\(label): \(v.label) is gone"); continue }
                guard let o else { continue }
                if a.content.count != o.content.count && a.content.count != n.content.count {
                    issue("\(label): \(v.label): size \(a.content.count), neither old \(o.content.count) nor new \(n.content.count)")
                }
                let (bad, changed) = sectorsOldOrNew(after: a.content, old: o.content, new: n.content)
                if v.snapshot == nil && s.model == v.file {
                    if let bad = modelMismatch(after: a.content, old: o.content, requests: attempts) {
                        issue("\(label): \(v.label): sector \(bad) (offset \(bad * sector)) reads a value no request sequence explains")
                    }
                } else if let bad {
                    issue("\(label): \(v.label): sector \(bad) (offset \(bad * sector)) reads neither its old nor its new value")
                }
                if v.snapshot == nil { changedByFile[v.file] = changed }
                for c in completed where c.file == dir + "/" + v.file {
                    let first = Int(c.offset) / sector, last = Int(c.offset + c.length - 1) / sector
                    let lo = Int(c.offset), hi = Int(c.offset + c.length)
                    if hi <= a.content.count, a.content[lo..<hi] != n.content[lo..<hi] {
                        issue("\(label): \(v.label): the completed request at \(c.offset)+\(c.length) (sectors \(first)...\(last)) does not read its new value")
                    }
                }
            case .absentOrNew:
                if let a, a.content != n.content { issue("\(label): \(v.label) exists but is not complete") }
            case .unchangedFile:
                if a?.content != o?.content { issue("\(label): \(v.label) changed") }
            case .partial:
                if let a {
                    let (bad, _) = sectorsOldOrNew(after: a.content, old: Data(), new: n.content)
                    if let bad { issue("\(label): \(v.label): sector \(bad) reads neither zeros nor the new value") }
                }
            }
        }
        for (file, rule) in s.bitmaps {
            let o = (old[file] ?? nil)?.bitmaps ?? [:], n = (new[file] ?? nil)?.bitmaps ?? [:]
            guard let a = (after[file] ?? nil)?.bitmaps else { continue }
            let g = { (name: String) in o[name]?.granularity ?? n[name]?.granularity ?? 65536 }
            switch rule {
            case .atomic:
                if a != o && a != n {
                    issue("\(label): \(file): the bitmaps are neither the old set nor the new one: \(describe(a)) (old \(describe(o)), new \(describe(n)))")
                }
            case .lowered:
                if a == o || a == n { break }
                for (name, b) in a {
                    guard let ob = o[name], let nb = n[name], !b.inUse, b.auto == ob.auto,
                          nb.bits.isSubset(of: b.bits), b.bits.isSubset(of: ob.bits) else {
                        issue("\(label): \(file): bitmap \(name) is neither old, new, nor between them: \(describe(a)) (old \(describe(o)), new \(describe(n)))")
                        continue
                    }
                }
                if Set(a.keys) != Set(o.keys) { issue("\(label): \(file): bitmap names changed to \(a.keys.sorted())") }
            case .exactOrInUse:
                if Set(a.keys) != Set(o.keys) && Set(a.keys) != Set(n.keys) {
                    issue("\(label): \(file): bitmap names \(a.keys.sorted()), neither old \(o.keys.sorted()) nor new \(n.keys.sorted())")
                }
                for (name, b) in a where !b.inUse && b != o[name] && b != n[name] {
                    issue("\(label): \(file): bitmap \(name) is not in use but neither its old nor its new version: \(describe([name: b]))")
                }
            case .tracking:
                if Set(a.keys) != Set(o.keys) {
                    issue("\(label): \(file): bitmap names \(a.keys.sorted()), expected \(o.keys.sorted())")
                }
                for (name, b) in a where !b.inUse {
                    guard let ob = o[name], let nb = n[name] else { continue }
                    if !ob.auto {
                        if b != ob { issue("\(label): \(file): disabled bitmap \(name) changed") }
                        continue
                    }
                    if !ob.bits.isSubset(of: b.bits) || !b.bits.isSubset(of: nb.bits) {
                        issue("\(label): \(file): bitmap \(name) is not in use but not between its old and new bits")
                    }
                    let gran = g(name)
                    let missing = (changedByFile[file] ?? []).map { UInt64($0 * sector) / gran }.filter { !b.bits.contains($0) }
                    if let m = missing.first {
                        issue("\(label): \(file): bitmap \(name) is not in use but misses changed granule \(m)")
                    }
                }
            }
        }
        // A failed backup removes its temporary file.
        if let t = s.backupTarget, let left = temporaryFiles(dir, of: t).first {
            issue("\(label): \(left) was left behind")
        }
        // A backup's bitmap changes only once the target is in place.
        if let t = s.backupTarget, (after[t] ?? nil) == nil {
            for (file, _) in s.bitmaps {
                let o = (old[file] ?? nil)?.bitmaps, a = (after[file] ?? nil)?.bitmaps
                if o != a { issue("\(label): \(file): the bitmap changed although there is no backup target") }
            }
        }
    }

    /// The first sector that reads neither its old value nor, for the requests covering
    /// it, the fill of the last one that succeeded or of a failed one after it.
    static func modelMismatch(after: Data, old: Data, requests: [ModelRequest]) -> Int? {
        after.withUnsafeBytes { a -> Int? in
            old.withUnsafeBytes { o -> Int? in
                for i in 0..<(a.count / sector) {
                    let lo = UInt64(i * sector)
                    var oldOK = true
                    var fills: Set<UInt8> = []
                    for r in requests where r.offset <= lo && lo + UInt64(sector) <= r.offset + r.length {
                        if r.ok { oldOK = false; fills = [r.fill] } else { fills.insert(r.fill) }
                    }
                    let s = a.baseAddress! + i * sector
                    if oldOK && (i + 1) * sector <= o.count && memcmp(s, o.baseAddress! + i * sector, sector) == 0 { continue }
                    if oldOK && (i + 1) * sector > o.count && fills.isEmpty { continue }
                    let p = s.assumingMemoryBound(to: UInt8.self)
                    let v = p[0]
                    if fills.contains(v) && (1..<sector).allSatisfy({ p[$0] == v }) { continue }
                    return i
                }
                return nil
            }
        }
    }

    static func verifyRetry(_ s: FaultScenario, label: String, old: DirState, new: DirState, after: DirState, final: DirState) {
        for v in s.views {
            let n = new[v.label] ?? nil, f = final[v.label] ?? nil
            if n?.content != f?.content { issue("\(label): \(v.label) does not read its new content") }
        }
        for (file, rule) in s.bitmaps {
            guard let f = (final[file] ?? nil)?.bitmaps, let n = (new[file] ?? nil)?.bitmaps else { continue }
            for name in Set(f.keys).union(n.keys) where f[name] != n[name] {
                // A bitmap the failure left in use stays so (qimg never trusts it again),
                // unless the recovery removed it.
                let wasInUse = (after[file] ?? nil)?.bitmaps?[name]?.inUse == true
                if !(wasInUse && rule != .atomic && f[name]?.inUse != false) {
                    issue("\(label): \(file): bitmap \(name) is not its new version: \(describe(f.filter { $0.key == name })) vs \(describe(n.filter { $0.key == name }))")
                }
            }
        }
    }

    static func describe(_ m: [String: BitmapState]) -> String {
        "[" + m.keys.sorted().map { k in
            let b = m[k]!
            return "\(k):\(b.inUse ? "in-use," : "")\(b.auto ? "auto," : "")\(b.bits.count) bits"
        }.joined(separator: " ") + "]"
    }
}
#endif
