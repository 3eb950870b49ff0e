#if canImport(Glibc)
import Glibc
#endif
import CLinux

/// A new file written under a temporary name beside its final path, made durable, and
/// only then renamed into place: an interrupted writer never leaves a partial file under
/// the final name.
///
/// Temporary names are `FINAL.<pid>-<token>.qimg-tmp`. The run that made one holds an
/// exclusive lock on it (an open-file-description lock on `guardByte`, outside the bytes
/// QEMU locks) for as long as it lives; the kernel drops that lock with the process,
/// whatever kills it. So any run tells a live run's file (locked) from a dead run's
/// (unlocked) and its own (its pid and token), and removes only dead runs' files.
public final class StagedFile {
    /// Where the file goes when it is committed.
    public let finalPath: String
    /// Where it is written until then.
    public let temporaryPath: String
    private var guardFD: Int32
    public private(set) var committed = false

    public static let temporarySuffix = ".qimg-tmp"
    /// The byte a live run locks exclusively (QEMU uses bytes 100...203).
    static let guardByte: Int64 = 1024
    /// The permission bits new temporary files are created with (the umask applies):
    /// a caller copying an image sets its source's bits for the scope of the copy, so that
    /// the copy is never readable by more users than the source.
    @TaskLocal public static var creationMode: mode_t = 0o644

    /// `e`, named after the final path when it is about the temporary file (errors are
    /// reported under the name the user gave).
    public func naming(_ e: Error) -> Error {
        if let q = e as? QCow2Error, q.path == temporaryPath { return q.withPath(finalPath) }
        return e
    }

    /// Creates an empty temporary file for `finalPath`, after removing dead runs'
    /// temporary files from its directory.
    public init(final finalPath: String) throws {
        self.finalPath = finalPath
        _ = Self.removeDeadLeftovers(besides: finalPath)
        for _ in 0..<64 {
            let token = String(UInt32.random(in: 0...UInt32.max), radix: 16)
            let name = "\(finalPath).\(getpid())-\(token)\(Self.temporarySuffix)"
            var fd: Int32
            repeat { fd = Sys.open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, Self.creationMode) } while fd < 0 && errno == EINTR
            if fd < 0 {
                if errno == EEXIST { continue }
                throw QCow2Error.io(path: finalPath, operation: "create", errno: errno)
            }
            switch Self.lockGuard(fd) {
            case .busy:
                // A cleaner took the file between its creation and our lock: it removes it.
                close(fd)
                continue
            case .locked, .unsupported:
                break
            }
            // A cleaner may have removed the name before we locked: the name must still be ours.
            guard Self.sameFile(fd, name) else { close(fd); continue }
            temporaryPath = name
            guardFD = fd
            return
        }
        throw QCow2Error.io(path: finalPath, operation: "create", errno: EEXIST)
    }

    deinit { discard() }

    /// Removes the temporary file unless it was committed.
    public func discard() {
        if !committed && guardFD >= 0 {
            // Only while the name is still our file (a failed create may have removed it).
            if Self.sameFile(guardFD, temporaryPath) { _ = Sys.unlink(temporaryPath) }
        }
        if guardFD >= 0 { close(guardFD); guardFD = -1 }
    }

    /// Renames the temporary file to `destination` (the final path unless given): over an
    /// existing file only with `replacing`, else failing if one exists (atomically, even
    /// against another run). With `durable`, the directory is synced afterwards; the caller
    /// has made the file itself durable.
    public func commit(replacing: Bool, durable: Bool, as destination: String? = nil) throws {
        let dest = destination ?? finalPath
        if replacing {
            guard Sys.rename(temporaryPath, dest) == 0 else { throw QCow2Error.io(path: dest, operation: "rename", errno: errno) }
        } else {
            try Self.renameNoReplace(temporaryPath, dest)
        }
        committed = true
        close(guardFD)
        guardFD = -1
        if durable { try Self.syncDirectory(of: dest) }
    }

    // MARK: - Leftovers

    /// Removes the temporary files of dead runs from the directory of `path` (whatever
    /// their final name); live runs' files are left alone. Returns how many were removed.
    @discardableResult
    public static func removeDeadLeftovers(besides path: String) -> Int {
        let dir = directory(of: path)
        guard let d = Sys.opendir(dir) else { return 0 }
        defer { closedir(d) }
        var names: [String] = []
        while let e = readdir(d) {
            let name = Sys.name(of: e)
            if name.hasSuffix(temporarySuffix) { names.append(name) }
        }
        var removed = 0
        for name in names {
            let p = dir == "/" ? "/" + name : dir + "/" + name
            let fd = Sys.open(p, O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
            guard fd >= 0 else { continue }
            defer { close(fd) }
            var st = stat()
            guard fstat(fd, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }
            // Locked: a live run's. Unsupported: cannot tell, so leave it.
            guard case .locked = lockGuard(fd), sameFile(fd, p) else { continue }
            if Sys.unlink(p) == 0 { removed += 1 }
        }
        return removed
    }

    // MARK: - System calls

    enum GuardResult { case locked, busy, unsupported }

    static func lockGuard(_ fd: Int32) -> GuardResult {
        var fl = ImageLock.makeFlock(type: F_WRLCK, start: guardByte, length: 1)
        var rc: Int32
        repeat { rc = fcntl(fd, ImageLock.setLock, &fl) } while rc < 0 && errno == EINTR
        if rc == 0 { return .locked }
        return errno == EAGAIN || errno == EACCES ? .busy : .unsupported
    }

    static func sameFile(_ fd: Int32, _ path: String) -> Bool {
        var a = stat(), b = stat()
        return fstat(fd, &a) == 0 && Sys.lstat(path, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino
    }

    /// rename(2) that fails with EEXIST when `to` exists: renameat2(RENAME_NOREPLACE), or
    /// link+unlink on filesystems without it.
    static func renameNoReplace(_ from: String, _ to: String) throws {
        let rc = PathCodec.withCPath(from) { f in PathCodec.withCPath(to) { renameat2(QIMG_AT_FDCWD, f, QIMG_AT_FDCWD, $0, QIMG_RENAME_NOREPLACE) } }
        if rc == 0 { return }
        var e = errno
        if e == EINVAL || e == ENOSYS || e == ENOTSUP {
            if Sys.link(from, to) == 0 { _ = Sys.unlink(from); return }
            e = errno
        }
        if e == EEXIST {
            throw QCow2Error.invalidArgument(path: to, detail: "the target appeared while it was being written (another run?); nothing was replaced")
        }
        throw QCow2Error.io(path: to, operation: "rename", errno: e)
    }

    /// The directory part of `path` ("." for a bare name).
    public static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// fsync of the directory holding `path` (makes a rename or create durable).
    public static func syncDirectory(of path: String) throws {
        let dir = directory(of: path)
        let fd = Sys.open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw QCow2Error.io(path: dir, operation: "open", errno: errno) }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw QCow2Error.io(path: dir, operation: "fsync", errno: errno) }
    }
}
