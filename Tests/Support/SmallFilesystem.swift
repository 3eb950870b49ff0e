import Foundation

/// A small tmpfs mounted for a test at `path` (a target disk that fills up); mounting needs
/// root, and a test that cannot mount it fails. `unmount()` when done.
public final class SmallFilesystem {
    public let path: String

    public init(at path: String, size: String = "1m") throws {
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        let mount = try Runner.run("/bin/mount", ["-t", "tmpfs", "-o", "size=\(size),mode=0700", "tmpfs", path])
        guard mount.status == 0 else { throw TestFailure("a tmpfs is needed for this test (root): \(mount.err)") }
        self.path = path
    }

    public func unmount() { _ = try? Runner.run("/bin/umount", [path]) }
}
