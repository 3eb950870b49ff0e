import Foundation
import Testing
import TestSupport
@testable import QCow2

/// The metadata cache stays within its cap however large the image is: a 1 TiB
/// image with data in 256 different L2 ranges is mapped and read with a cache of
/// 8 L2 tables, and the answers still match qemu-img's.
@Suite struct MemoryBoundTests {
    @Test(.requiresQEMU) func mapOfOneTebibyteImageIsBoundedByTheCacheCap() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("qimg-mem-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("big.qcow2").path
        #expect(try Runner.qemuImg(["create", "-q", "-f", "qcow2", path, "1T"]).status == 0)
        // One 64 KiB write in each of 256 L2 ranges (512 MiB each at 64 KiB clusters).
        var args = ["-f", "qcow2"]
        for i in 0..<256 { args += ["-c", "write -P \(i % 250 + 1) \(UInt64(i) * 4 << 30) 64k"] }
        #expect(try Runner.qemuIO(args + [path]).status == 0)

        let cap = 8 * 65536
        var opener = ImageOpener()
        opener.cacheBytes = cap
        let image = try #require(try opener.open(path) as? QCow2Image)
        var entries: [MapEntry] = []
        try MapOperation.run(image) { entries.append($0) }
        #expect(image.l2Cache.residentBytes <= cap)
        #expect(image.l2Cache.misses >= 256)
        #expect(entries.filter(\.data).count == 256)
        // Same answer as qemu-img.
        let map = try Runner.qemuImg(["map", "--output=json", path])
        #expect(map.status == 0)
        #expect(map.out.split(separator: "\n").count == entries.count)
        // Reads through the capped cache return the written pattern.
        for i in [0, 17, 255] {
            let bytes = try image.read(count: 65536, at: UInt64(i) * 4 << 30)
            #expect(bytes.allSatisfy { $0 == UInt8(i % 250 + 1) })
        }
        #expect(image.l2Cache.residentBytes <= cap)
    }
}
