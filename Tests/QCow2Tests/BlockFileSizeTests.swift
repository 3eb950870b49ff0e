import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif
@testable import QCow2

/// `BlockFile.tracksSize`: a copy's target answers `size()` from the length it has seen
/// (the write path asks after every change) instead of an fstat per call; the answer
/// must stay the file's real length through writes, truncations and allocations.
@Suite struct BlockFileSizeTests {
    /// The length the kernel reports, through a second descriptor.
    static func realSize(_ path: String) throws -> UInt64 { try BlockFile(path: path).size() }

    @Test
    func trackedSizeFollowsWritesTruncationsAndAllocations() throws {
        let path = try Paths.newScratch("blockfile-size") + "/f"
        let f = try BlockFile(creating: path)
        f.tracksSize = true
        #expect(try f.size() == 0)
        let block = [UInt8](repeating: 0xab, count: 4096)
        var expected: [UInt64] = []
        var seen: [UInt64] = []
        // Past the end, inside, past the end again with a hole, then shrink, grow, allocate.
        let steps: [(String, (BlockFile) throws -> Void)] = [
            ("write at 0", { try $0.write(block, at: 0) }),
            ("write inside", { try $0.write(block, at: 1024) }),
            ("write past a hole", { try $0.write(block, at: 1 << 20) }),
            ("truncate down", { try $0.truncate(to: 5000) }),
            ("truncate up", { try $0.truncate(to: 3 << 20) }),
            ("write ending inside", { try $0.write(block, at: 8192) }),
            ("preallocate past the end", { _ = $0.preallocate(at: 4 << 20, length: 65536) }),
            ("write after preallocation", { try $0.write(block, at: 100) }),
        ]
        for (_, step) in steps {
            try step(f)
            seen.append(try f.size())
            expected.append(try Self.realSize(path))
        }
        #expect(seen == expected, "\(steps.map(\.0))")
        #expect(expected.last == (4 << 20) + 65536)
    }

    @Test
    func trackedSizeIsNotQueriedAgain() throws {
        let path = try Paths.newScratch("blockfile-size-cached") + "/f"
        let f = try BlockFile(creating: path)
        f.tracksSize = true
        try f.write([UInt8](repeating: 1, count: 512), at: 0)
        #expect(try f.size() == 512)
        // Another descriptor grows the file: a tracked size does not see it (the reason it
        // is only for files nothing else changes), an untracked one does.
        try BlockFile(path: path, writable: true).write([UInt8](repeating: 2, count: 512), at: 4096)
        #expect(try f.size() == 512)
        f.tracksSize = false
        #expect(try f.size() == 4608)
    }
}
