import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif
@testable import QCow2

/// Writing gigabytes through `QCow2Image.write` keeps memory bounded: the peak
/// resident set grows by less than 64 MiB plus the metadata cache cap (1 MiB here),
/// whatever the amount written. Writes go in 8 MiB chunks of repeated patterns
/// (each stamped with its chunk number); a few chunks are read back afterwards.
///
/// 4 GiB (about 12 s alone on the 2-core CI machine, the file written in full and
/// deleted afterwards); QIMG_SHORT_TESTS=1 writes 1 GiB instead.
///
/// `swift test` runs tests in parallel in one process, so other tests' allocations
/// would count too: the measurement runs in a child process, this test binary again
/// with `--filter WriteMemoryTests` and QIMG_MEMORY_CHILD=1 (in-process when the
/// binary cannot be re-run, e.g. outside `swift test`).
@Suite struct WriteMemoryTests {
    static let environment = ProcessInfo.processInfo.environment
    static let isChild = environment["QIMG_MEMORY_CHILD"] == "1"
    static let chunk = 8 << 20
    static let cacheCap = 1 << 20
    static let bound = (64 << 20 + cacheCap) * Env.memoryBoundScale

    @Test
    func writingGibibytesKeepsMemoryBounded() throws {
        if Self.isChild { return try Self.workload() }
        guard let exe = Self.testBinary() else { return try Self.workload() }

        let r = try Runner.run(exe, ["--testing-library", "swift-testing", "--filter", "WriteMemoryTests"],
                               extraEnvironment: ["QIMG_MEMORY_CHILD": "1"], timeout: 300)
        let text = r.out + r.err
        if let summary = text.split(separator: "\n").first(where: { $0.hasPrefix("WriteMemoryTests:") }) {
            print(summary)
        }
        if !r.exitedNormally || r.status != 0 {
            let tail = text.split(separator: "\n").suffix(30).joined(separator: "\n")
            Issue.record("the child test run failed (\(r.summary)):\n\(tail)")
        }
    }

    /// This test binary (`…PackageTests.xctest`), if that is what is running.
    static func testBinary() -> String? {
        guard let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"),
              exe.hasSuffix(".xctest") else { return nil }
        return exe
    }

    static func kibibytes(_ field: String) -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix(field + ":") {
            return Int(line.dropFirst(field.count + 1).split(whereSeparator: { $0 == " " || $0 == "\t" }).first ?? "")
        }
        return nil
    }

    /// Resets VmHWM to the current RSS ("5" to clear_refs); false when not permitted.
    static func resetPeak() -> Bool {
        let fd = open("/proc/self/clear_refs", O_WRONLY)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return write(fd, "5", 1) == 1
    }

    static func workload() throws {
        let total: UInt64 = environment["QIMG_SHORT_TESTS"] == "1" ? 1 << 30 : 4 << 30
        let tmp = environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp"
        let dir = tmp + "/qimg-writemem-\(getpid())-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/big.qcow2"
        var options = CreateOptions()
        options.format = .qcow2
        options.size = total
        try ImageCreator.create(path, options: options)

        var opener = ImageOpener()
        opener.writable = true
        opener.cacheBytes = cacheCap
        let img = try #require(try opener.open(path) as? QCow2Image)

        var buf = [UInt8](repeating: 0, count: chunk)
        func fill(_ i: Int) {
            buf.withUnsafeMutableBytes { b in
                _ = memset(b.baseAddress!, Int32(pattern(i)), b.count)
                b.storeBytes(of: UInt64(i).littleEndian, toByteOffset: 0, as: UInt64.self)
            }
        }
        fill(0)
        let peakReset = resetPeak()
        let start = try #require(kibibytes("VmRSS"))
        var sampled = start
        let began = Date()
        let chunks = Int(total) / chunk
        for i in 0..<chunks {
            fill(i)
            try buf.withUnsafeBytes { try img.write($0, at: UInt64(i * chunk)) }
            if i % 8 == 0 { sampled = max(sampled, kibibytes("VmRSS") ?? 0) }
        }
        try img.flush()
        sampled = max(sampled, kibibytes("VmRSS") ?? 0)
        let seconds = Date().timeIntervalSince(began)
        let peak = peakReset ? max(sampled, kibibytes("VmHWM") ?? 0) : sampled
        let growth = (peak - start) * 1024
        print("WriteMemoryTests: wrote \(total >> 20) MiB in \(String(format: "%.1f", seconds)) s; peak RSS grew by \(growth >> 10) KiB (bound \(bound >> 10) KiB; \(peakReset ? "VmHWM after reset" : "sampled VmRSS"))")
        #expect(growth < bound, "peak RSS grew by \(growth >> 20) MiB writing \(total >> 30) GiB (bound \(bound >> 20) MiB)")
        #expect(img.l2Cache.residentBytes <= cacheCap)

        for i in [0, 1, chunks / 2 + 3, chunks - 1] {
            let back = try img.read(count: chunk, at: UInt64(i * chunk))
            fill(i)
            let same = back.count == buf.count && back.withUnsafeBytes { a in
                buf.withUnsafeBytes { b in memcmp(a.baseAddress!, b.baseAddress!, b.count) == 0 }
            }
            #expect(same, "chunk \(i) reads back wrong")
        }
    }

    static func pattern(_ i: Int) -> UInt8 { UInt8(i % 251 + 1) }
}
