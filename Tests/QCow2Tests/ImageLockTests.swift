// ImageLock against real QEMU 7.2: our locks must stop QEMU where QEMU's own
// locks would, and QEMU's locks must stop us.

import Foundation
import Testing
import TestSupport
#if canImport(Glibc)
import Glibc
#endif
@testable import QCow2

/// A temporary directory holding one fresh 1 MiB qcow2 image.
private final class LockScratch {
    let dir: String
    let image: String

    init() throws {
        dir = Paths.work + "/imagelock-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        image = dir + "/img.qcow2"
        let r = try Runner.qemuImg(["create", "-f", "qcow2", image, "1M"], timeout: 10)
        guard r.exitedNormally, r.status == 0 else {
            throw TestFailure("\(r.summary): \(r.err)")
        }
    }

    /// Opens the image with Glibc `open` (O_CLOEXEC so QEMU children never inherit it).
    func openImage(writable: Bool) throws -> Int32 {
        let fd = open(image, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC)
        guard fd >= 0 else { throw TestFailure("open \(image): errno \(errno)") }
        return fd
    }

    deinit { try? FileManager.default.removeItem(atPath: dir) }
}

/// qemu-io holding the image open, and locked, until `stop()`: it reads its commands from
/// a pipe, and its answer to a first `read` proves that it has opened the image (QEMU takes
/// its locks when it opens the image, before it reads any command).
private final class BackgroundQEMU {
    let child: PipedProcess

    init(_ args: [String], image: String) throws {
        child = try PipedProcess(try qemuIOPath(), args + [image])
        try child.send("read 0 512\n")
        try child.waitForLine(containing: "read 512/512 bytes at offset 0")
    }

    /// Requires the lock on `byte` of `path` to be there now.
    func expectLock(on path: String, byte: Int, sourceLocation: SourceLocation = #_sourceLocation) throws {
        try #require(lockHeld(on: path, byte: byte),
                     "\(child.command) has the image open, but holds no lock on byte \(byte)",
                     sourceLocation: sourceLocation)
    }

    var pid: Int32 { child.process.processIdentifier }

    func stop() { child.stop() }
}

private func expectConflict(_ mode: LockMode, fd: Int32, path: String, detail: String,
                            sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        try ImageLock.acquire(fd: fd, path: path, mode: mode)
        Issue.record("acquire(\(mode)) succeeded, expected a conflict", sourceLocation: sourceLocation)
    } catch let e as QCow2Error {
        guard case .inUse(_, _, let readOnlyShareWorks) = e else { Issue.record("not an in-use error: \(e)", sourceLocation: sourceLocation); return }
        // The CLI's line: the library's message and, when reading without locks works, the -U hint.
        let line = e.message + (readOnlyShareWorks ? "; use -U for read-only inspection" : "")
        #expect(e.path == path && line == detail, sourceLocation: sourceLocation)
    } catch {
        Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
    }
}

private func qemuIOPath() throws -> String {
    guard let exe = Env.qemuIO else { throw TestFailure(Env.missingQEMUMessage) }
    return exe
}

/// The refusal naming `holder` ("qemu-io (pid N)", "another qimg"), with the -U hint or not.
private func inUse(by holder: String, hint: Bool = true) -> String {
    "image is in use by \(holder)" + (hint ? "; use -U for read-only inspection" : "")
}

@Suite("ImageLock", .requiresQEMU)
struct ImageLockTests {

    @Test("a. QEMU writer (qemu-io) holds the image: .write and .read conflict, .none works")
    func qemuWriterBlocksUs() throws {
        let s = try LockScratch()
        let qemu = try BackgroundQEMU(["-f", "qcow2"], image: s.image)
        defer { qemu.stop() }
        try qemu.expectLock(on: s.image, byte: 203)

        let fd = try s.openImage(writable: true)
        defer { close(fd) }
        // The holder is named, with its pid (read from /proc/PID/fdinfo).
        let holder = "qemu-io (pid \(qemu.pid))"
        expectConflict(.write, fd: fd, path: s.image, detail: inUse(by: holder))
        expectConflict(.read, fd: fd, path: s.image, detail: inUse(by: holder))
        try ImageLock.acquire(fd: fd, path: s.image, mode: .none)
        // A failed acquire leaves nothing behind: QEMU's writer is undisturbed
        // and, once it is gone, we can lock.
        qemu.stop()
        try ImageLock.acquire(fd: fd, path: s.image, mode: .write)
        ImageLock.release(fd: fd)
    }

    @Test("a'. QEMU reader (qemu-io -r): .write conflicts without the -U hint, .read works")
    func qemuReaderBlocksOurWrite() throws {
        let s = try LockScratch()
        let qemu = try BackgroundQEMU(["-r", "-f", "qcow2"], image: s.image)
        defer { qemu.stop() }
        try qemu.expectLock(on: s.image, byte: 203)

        let fd = try s.openImage(writable: true)
        defer { close(fd) }
        expectConflict(.write, fd: fd, path: s.image, detail: inUse(by: "qemu-io (pid \(qemu.pid))", hint: false))
        try ImageLock.acquire(fd: fd, path: s.image, mode: .read)
        ImageLock.release(fd: fd)
    }

    @Test("a''. QEMU force-share reader (qemu-io -r -U, byte 100 only) does not block .write")
    func forceShareReaderDoesNotBlock() throws {
        let s = try LockScratch()
        let qemu = try BackgroundQEMU(["-r", "-U", "-f", "qcow2"], image: s.image)
        defer { qemu.stop() }
        try qemu.expectLock(on: s.image, byte: 100)

        let fd = try s.openImage(writable: true)
        defer { close(fd) }
        try ImageLock.acquire(fd: fd, path: s.image, mode: .write)
        ImageLock.release(fd: fd)
    }

    @Test("b. We hold .write: qemu-img info fails, info -U works, works again after release")
    func ourWriteLockBlocksQEMU() throws {
        let s = try LockScratch()
        let fd = try s.openImage(writable: true)
        defer { close(fd) }
        try ImageLock.acquire(fd: fd, path: s.image, mode: .write)

        let blocked = try Runner.qemuImg(["info", s.image], timeout: 10)
        #expect(blocked.exitedNormally && blocked.status == 1, "\(blocked.summary)")
        #expect(blocked.err.contains("lock"))
        #expect(blocked.err.contains("Failed to get shared \"write\" lock"), "\(blocked.err)")
        #expect(blocked.err.contains("Is another process using the image [\(s.image)]?"), "\(blocked.err)")

        let shared = try Runner.qemuImg(["info", "-U", s.image], timeout: 10)
        #expect(shared.exitedNormally && shared.status == 0, "\(shared.summary): \(shared.err)")

        // A QEMU writer is refused too, on the "write" byte we deny.
        let writer = try Runner.qemuIO(["-c", "write 0 512", "-f", "qcow2", s.image], timeout: 10)
        #expect(writer.status == 1 && writer.err.contains("Failed to get \"write\" lock"), "\(writer.err)")

        ImageLock.release(fd: fd)
        let after = try Runner.qemuImg(["info", s.image], timeout: 10)
        #expect(after.exitedNormally && after.status == 0, "\(after.summary): \(after.err)")
    }

    @Test("b'. Closing the fd drops the locks")
    func closingDropsLocks() throws {
        let s = try LockScratch()
        let fd = try s.openImage(writable: true)
        try ImageLock.acquire(fd: fd, path: s.image, mode: .write)
        #expect(try Runner.qemuImg(["info", s.image], timeout: 10).status == 1)
        close(fd)
        let after = try Runner.qemuImg(["info", s.image], timeout: 10)
        #expect(after.status == 0, "\(after.err)")
    }

    @Test("c. We hold .read: qemu-img info works, a qemu-io write fails")
    func ourReadLock() throws {
        let s = try LockScratch()
        let fd = try s.openImage(writable: false)
        defer { close(fd) }
        try ImageLock.acquire(fd: fd, path: s.image, mode: .read)

        let info = try Runner.qemuImg(["info", s.image], timeout: 10)
        #expect(info.exitedNormally && info.status == 0, "\(info.summary): \(info.err)")

        let write = try Runner.qemuIO(["-c", "write 0 512", "-f", "qcow2", s.image], timeout: 10)
        #expect(write.exitedNormally && write.status == 1, "\(write.summary)")
        #expect(write.err.contains("Failed to get \"write\" lock"), "\(write.err)")

        // Downgrading from .write to .read through acquire unlocks 101/103.
        ImageLock.release(fd: fd)
        let wfd = try s.openImage(writable: true)
        defer { close(wfd) }
        try ImageLock.acquire(fd: wfd, path: s.image, mode: .write)
        try ImageLock.acquire(fd: wfd, path: s.image, mode: .read)
        let info2 = try Runner.qemuImg(["info", s.image], timeout: 10)
        #expect(info2.status == 0, "\(info2.err)")
    }

    @Test("d. Two fds in one process are two open file descriptions: they conflict like two processes")
    func twoDescriptionsInOneProcess() throws {
        let s = try LockScratch()
        let reader = try s.openImage(writable: false)
        defer { close(reader) }
        let writer = try s.openImage(writable: true)
        defer { close(writer) }

        try ImageLock.acquire(fd: reader, path: s.image, mode: .read)
        // The reader denies write (201): our own .write on another description is refused.
        // The holder holds qimg's mark byte: another qimg (this very process, so no pid).
        expectConflict(.write, fd: writer, path: s.image, detail: inUse(by: "another qimg", hint: false))
        // Two readers are compatible.
        try ImageLock.acquire(fd: writer, path: s.image, mode: .read)
        ImageLock.release(fd: writer)

        // The same description never conflicts with itself (re-acquire, upgrade).
        try ImageLock.acquire(fd: reader, path: s.image, mode: .read)
        ImageLock.release(fd: reader)
        try ImageLock.acquire(fd: writer, path: s.image, mode: .write)
        try ImageLock.acquire(fd: writer, path: s.image, mode: .write)
        // ...and a dup() shares the description, hence the locks.
        let dupped = dup(writer)
        defer { close(dupped) }
        try ImageLock.acquire(fd: dupped, path: s.image, mode: .write)
        expectConflict(.read, fd: reader, path: s.image, detail: inUse(by: "another qimg"))
        ImageLock.release(fd: writer)
        try ImageLock.acquire(fd: reader, path: s.image, mode: .read)
    }
}
