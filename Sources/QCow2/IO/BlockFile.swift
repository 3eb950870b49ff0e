#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An open file with positional I/O. Reads past the end of the file return
/// zeros (qcow2 files need not end on a cluster boundary).
public final class BlockFile {
    public let path: String
    public let fd: Int32
    public let writable: Bool

    public init(path: String, writable: Bool = false) throws {
        self.path = path
        self.writable = writable
        var st = stat()
        let flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC
        var fd: Int32
        repeat { fd = open(path, flags) } while fd < 0 && errno == EINTR
        guard fd >= 0 else {
            let e = errno
            throw QCow2Error.io(path: path, operation: "open", errno: e)
        }
        guard fstat(fd, &st) == 0 else {
            let e = errno
            close(fd)
            throw QCow2Error.io(path: path, operation: "stat", errno: e)
        }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            close(fd)
            throw QCow2Error.io(path: path, operation: "open", errno: EISDIR)
        }
        self.fd = fd
    }

    /// Creates (or truncates) `path` and opens it read-write.
    public init(creating path: String, mode: mode_t = 0o644) throws {
        self.path = path
        self.writable = true
        var fd: Int32
        repeat { fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, mode) } while fd < 0 && errno == EINTR
        guard fd >= 0 else { throw QCow2Error.io(path: path, operation: "create", errno: errno) }
        self.fd = fd
    }

    /// Makes the file's data and metadata durable (fsync).
    public func fullSync() throws {
        while fsync(fd) != 0 {
            if errno == EINTR { continue }
            throw QCow2Error.io(path: path, operation: "fsync", errno: errno)
        }
    }

    deinit { close(fd) }

    /// Current length of the file in bytes.
    public func size() throws -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw QCow2Error.io(path: path, operation: "stat", errno: errno) }
        if (st.st_mode & S_IFMT) == S_IFBLK {
            let end = lseek(fd, 0, SEEK_END)
            guard end >= 0 else { throw QCow2Error.io(path: path, operation: "lseek", errno: errno) }
            return UInt64(end)
        }
        return UInt64(st.st_size)
    }

    /// Bytes the file occupies on disk (st_blocks * 512), as qemu-img's "disk size".
    public func allocatedSize() throws -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw QCow2Error.io(path: path, operation: "stat", errno: errno) }
        return UInt64(max(0, st.st_blocks)) &* 512
    }

    /// Identity of the file (device, inode), for loop detection in backing chains.
    public func identity() throws -> FileIdentity {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw QCow2Error.io(path: path, operation: "stat", errno: errno) }
        return FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }

    /// Fills `buffer` from `offset`; bytes past the end of file read as zero.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        let total = buffer.count
        guard let base = buffer.baseAddress else { return }
        guard offset <= UInt64(Int64.max) - UInt64(total) else {
            throw QCow2Error.io(path: path, operation: "read", errno: EINVAL)
        }
        while done < total {
            let n = pread(fd, base + done, total - done, off_t(offset + UInt64(done)))
            if n < 0 {
                if errno == EINTR { continue }
                throw QCow2Error.io(path: path, operation: "read", errno: errno)
            }
            if n == 0 {
                (base + done).initializeMemory(as: UInt8.self, repeating: 0, count: total - done)
                return
            }
            done += n
        }
    }

    /// Reads `count` bytes at `offset` into a new array (zero-filled past EOF).
    public func read(count: Int, at offset: UInt64) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        do {
            try out.withUnsafeMutableBytes { (b: UnsafeMutableRawBufferPointer) throws in
                try self.read(into: b, at: offset)
            }
        }
        return out
    }

    /// Writes all of `buffer` at `offset`.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard writable else { throw QCow2Error.io(path: path, operation: "write", errno: EBADF) }
        guard let base = buffer.baseAddress else { return }
        guard offset <= UInt64(Int64.max) - UInt64(buffer.count) else {
            throw QCow2Error.io(path: path, operation: "write", errno: EINVAL)
        }
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, base + done, buffer.count - done, off_t(offset + UInt64(done)))
            if n < 0 {
                if errno == EINTR { continue }
                throw QCow2Error.io(path: path, operation: "write", errno: errno)
            }
            done += n
        }
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }

    /// When set, `sync()` (the ordering barriers of the write path) does nothing; only
    /// `fullSync()` makes data durable. For images that are not in use until they are
    /// complete and fsynced as a whole (convert and backup targets under a temporary name).
    public var deferSync = false

    /// Makes written data durable (fdatasync).
    public func sync() throws {
        if deferSync { return }
        while fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw QCow2Error.io(path: path, operation: "fdatasync", errno: errno)
        }
    }

    /// Sets the file length.
    public func truncate(to length: UInt64) throws {
        while ftruncate(fd, off_t(length)) != 0 {
            if errno == EINTR { continue }
            throw QCow2Error.io(path: path, operation: "truncate", errno: errno)
        }
    }

    /// Allocates disk blocks for [offset, offset+length) (fallocate mode 0); returns false
    /// when the file system cannot.
    public func preallocate(at offset: UInt64, length: UInt64) -> Bool {
        guard length > 0 else { return true }
        return posix_fallocate(fd, off_t(offset), off_t(length)) == 0
    }

    /// SEEK_DATA / SEEK_HOLE: returns the next data and hole offsets at or after `offset`,
    /// or nil when the offset is in the trailing hole (ENXIO). Throws for other errors.
    public func findAllocation(at offset: UInt64) -> (data: UInt64, hole: UInt64)?? {
        #if os(Linux)
        let d = lseek(fd, off_t(offset), 3 /* SEEK_DATA */)
        if d < 0 { return errno == ENXIO ? .some(nil) : nil }
        let h = lseek(fd, off_t(UInt64(d)), 4 /* SEEK_HOLE */)
        if h < 0 { return nil }
        if UInt64(d) > offset {
            return .some((UInt64(d), offset))
        }
        return .some((UInt64(d), UInt64(h)))
        #else
        return nil
        #endif
    }
}

public struct FileIdentity: Hashable, Sendable {
    public var device: UInt64
    public var inode: UInt64
}
