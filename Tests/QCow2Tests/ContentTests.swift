import Foundation
import Testing
import TestSupport
import QCow2
#if canImport(Glibc)
import Glibc
#endif

/// Guest content read through the library equals `qemu-img convert -O raw`
/// for every valid fixture, with 1 MiB chunks and with odd 12345-byte
/// chunks that cross cluster and subcluster boundaries.
@Suite struct ContentTests {
    static let chunkSizes = [1 << 20, 12345]

    @Test(.requiresQEMU, arguments: try Fixtures.manifestArguments())
    func contentMatchesQemuConvert(_ entry: ManifestEntry) throws {
        let f = try Fixtures.get()
        let rawPath = Paths.scratch + "/convert-\(UUID().uuidString).raw"
        defer { try? FileManager.default.removeItem(atPath: rawPath) }
        let conv = try Runner.qemuImg(["convert", "-f", entry.format, "-O", "raw", entry.name, rawPath],
                                      cwd: f.validDir)
        try #require(conv.exitedNormally && conv.status == 0, "qemu-img convert failed: \(conv.err)")

        let format = try #require(ImageFormat(rawValue: entry.format))
        let image = try ImageOpener().open(f.validDir + "/" + entry.name, format: format)
        let expected = try Data(contentsOf: URL(fileURLWithPath: rawPath), options: .alwaysMapped)
        let size = image.virtualSize
        // qemu-img rounds sizes up to 512 bytes; compare the first virtualSize bytes.
        try #require(UInt64(expected.count) >= size && UInt64(expected.count) - size < 512,
                     "\(entry.name): virtualSize \(size), converted raw has \(expected.count) bytes")

        for chunk in Self.chunkSizes {
            try compare(image, expected, size: size, chunk: chunk, label: entry.name)
        }
    }

    private func compare(_ image: any DiskImage, _ expected: Data, size: UInt64, chunk: Int, label: String) throws {
        var buffer = [UInt8](repeating: 0, count: chunk)
        var offset: UInt64 = 0
        while offset < size {
            let n = Int(min(UInt64(chunk), size - offset))
            do {
                try buffer.withUnsafeMutableBytes { b in
                    try image.read(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<n]), at: offset)
                }
            } catch {
                Issue.record("\(label): read of \(n) bytes at \(offset) (chunk \(chunk)) failed: \(error)")
                return
            }
            let start = Int(offset)
            let same = expected.withUnsafeBytes { e in
                buffer.withUnsafeBytes { b in memcmp(e.baseAddress! + start, b.baseAddress!, n) == 0 }
            }
            if !same {
                let i = (0..<n).first { expected[start + $0] != buffer[$0] } ?? 0
                Issue.record("""
                    \(label): chunk size \(chunk): first difference at guest offset \(offset + UInt64(i)): \
                    qemu-img 0x\(String(expected[start + i], radix: 16)), library 0x\(String(buffer[i], radix: 16))
                    """)
                return
            }
            offset += UInt64(n)
        }
    }

    @Test(.requiresQEMU) func readCountMatchesReadInto() throws {
        let f = try Fixtures.get()
        let image = try ImageOpener().open(f.validDir + "/xl2-top.qcow2", format: .qcow2)
        let bytes = try image.read(count: 70000, at: 130_000)
        #expect(bytes.count == 70000)
        #expect(bytes.allSatisfy { $0 == 0x42 })
        let probed = try ImageOpener().open(f.validDir + "/xl2-top.qcow2")
        #expect(probed.virtualSize == image.virtualSize)
    }
}
