#if canImport(Glibc)
import Glibc
#endif

/// The image a repository backup reads, held for the whole run: opened once, with
/// QEMU's read locks (no other writer, no VM, can open it) while the copy reads it through
/// its own opening, upgraded in place to write locks for the bitmap switch. No guest write
/// can fall between the copy and the switch.
final class SourceHold {
    let path: String
    let file: BlockFile
    /// The image as it was when the run started.
    let image: QCow2Image

    init(_ path: String) throws {
        self.path = path
        file = try BlockFile(path: path, writable: true)
        try ImageLock.acquire(fd: file.fd, path: path, mode: .read)
        guard try ImageOpener.probe(file, path: path) == .qcow2 else {
            throw QCow2Error.invalidArgument(path: path, detail: "a backup repository needs a qcow2 image (its persistent bitmap records the changes)")
        }
        image = try QCow2Image(path: path, file: file)
        guard image.header.version >= 3 else {
            throw QCow2Error.unsupported(path: path, detail: "a qcow2 version 2 image cannot store persistent bitmaps")
        }
    }

    /// The persistent bitmaps (none when an unaware writer left them stale).
    var bitmaps: [BitmapDirectoryEntry] {
        image.header.autoclearFeatures & Features.autoclearBitmaps != 0 ? image.bitmaps : []
    }

    /// One directory switch: `add` (empty, recording from now on) in, `remove` out;
    /// durable when it returns (the switch's last step ends with a barrier; the session
    /// wrote no guest data, so it has no bitmaps to store and nothing else to flush).
    func switchBitmaps(add: String, granularity: UInt64?, remove: [String]) throws {
        try ImageLock.acquire(fd: file.fd, path: path, mode: .write)
        let w = try QCow2Image(path: path, file: file)
        try w.enableWriting()
        try w.applyBitmapActions([(.add(granularity: granularity, disabled: false), add)] + remove.map { (.remove, $0) })
    }
}
