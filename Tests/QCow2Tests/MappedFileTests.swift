import Foundation
import Testing
import TestSupport
@testable import QCow2
#if canImport(Glibc)
import Glibc
#endif

/// `repo verify` hashes points straight from a read-only mapping (`MappedFile`). A file
/// that shrinks while it is mapped must not end the process with SIGBUS: the pages past
/// its new end read as zeros and the mapping says the file shrank.
@Suite struct MappedFileTests {
    @Test func aFileThatShrinksWhileMappedIsReportedNotFatal() throws {
        let dir = try Paths.newScratch("mapped-file")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/f"
        let size = 5 * 65536
        try Data(repeating: 0x5a, count: size).write(to: URL(fileURLWithPath: path))
        let file = try BlockFile(path: path)
        let map = try #require(MappedFile(file, size: UInt64(size)))
        #expect(map.bytes(UInt64(size - 16), 16).allSatisfy { $0 == 0x5a })
        #expect(!map.shrank)
        #expect(truncate(path, 65536) == 0)
        // Past the new end: a SIGBUS without the guard.
        #expect(map.bytes(3 * 65536, 4096).allSatisfy { $0 == 0 })
        #expect(map.shrank)
        #expect(map.bytes(0, 65536).allSatisfy { $0 == 0x5a }, "what is left reads as before")
    }
}
