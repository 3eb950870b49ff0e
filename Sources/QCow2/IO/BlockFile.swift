#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An open file with positional I/O. Reads past the end of the file return
/// zeros (qcow2 files need not end on a cluster boundary). Short transfers and
/// EINTR are retried. In debug builds every call consults the armed `FaultInjector`s,
/// if any (a testing aid; see FaultInjection.swift).
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
        repeat { fd = Sys.open(path, flags) } while fd < 0 && errno == EINTR
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
        repeat { fd = Sys.open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, mode) } while fd < 0 && errno == EINTR
        guard fd >= 0 else { throw QCow2Error.io(path: path, operation: "create", errno: errno) }
        self.fd = fd
    }

    /// Makes the file's data and metadata durable (fsync).
    public func fullSync() throws {
        #if QIMG_FAULT_INJECTION
        if FaultInjector.isArmed, let e = FaultInjector.beforeSync(path) {
            if e == FaultPlan.kill { raise(SIGKILL) }
            throw QCow2Error.io(path: path, operation: "fsync", errno: e)
        }
        #endif
        while syncCall(full: true) != 0 {
            if errno == EINTR { continue }
            throw QCow2Error.io(path: path, operation: "fsync", errno: errno)
        }
    }

    /// One fsync/fdatasync system call (interrupted once first under fault injection).
    @inline(__always) private func syncCall(full: Bool) -> Int32 {
        #if QIMG_FAULT_INJECTION
        if FaultInjector.isArmed, FaultInjector.syscall(.sync, path, count: 1).interrupt {
            errno = EINTR
            return -1
        }
        #endif
        return full ? fsync(fd) : fdatasync(fd)
    }

    #if QIMG_FAULT_INJECTION
    /// The bytes one system call may transfer: `count`, or less (short transfer), or nil
    /// (interrupted) under fault injection.
    @inline(__always) private func allowedCount(_ kind: FaultInjector.Transfer, _ count: Int) -> Int? {
        guard FaultInjector.isArmed else { return count }
        let t = FaultInjector.syscall(kind, path, count: count)
        return t.interrupt ? nil : t.count
    }
    #endif

    /// One pread system call (short or interrupted under fault injection).
    @inline(__always) private func preadCall(_ p: UnsafeMutableRawPointer, _ count: Int, _ offset: UInt64) -> Int {
        #if QIMG_FAULT_INJECTION
        guard let count = allowedCount(.read, count) else { errno = EINTR; return -1 }
        #endif
        return pread(fd, p, count, off_t(offset))
    }

    /// One pwrite system call (short or interrupted under fault injection).
    @inline(__always) private func pwriteCall(_ p: UnsafeRawPointer, _ count: Int, _ offset: UInt64) -> Int {
        #if QIMG_FAULT_INJECTION
        guard let count = allowedCount(.write, count) else { errno = EINTR; return -1 }
        #endif
        return pwrite(fd, p, count, off_t(offset))
    }

    deinit { close(fd) }

    /// When set, `size()` answers from the length this object has seen (one fstat, then
    /// its own writes, truncations and allocations) instead of asking the kernel on every
    /// call (the write path asks after each change). Only for files nothing else changes
    /// while they are open: convert and backup targets under a run's locked temporary name.
    public var tracksSize = false { didSet { knownSize = nil } }
    private var knownSize: UInt64?

    /// Current length of the file in bytes.
    public func size() throws -> UInt64 {
        if let known = knownSize { return known }
        let size = try queriedSize()
        if tracksSize { knownSize = size }
        return size
    }

    /// The length the kernel reports (fstat; lseek for a block device).
    private func queriedSize() throws -> UInt64 {
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
        #if QIMG_FAULT_INJECTION
        if FaultInjector.isArmed, let e = FaultInjector.beforeRead(path) {
            throw QCow2Error.io(path: path, operation: "read", errno: e)
        }
        #endif
        while done < total {
            let n = preadCall(base + done, total - done, offset + UInt64(done))
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
        #if QIMG_FAULT_INJECTION
        var total = buffer.count
        var injected: Int32?
        if FaultInjector.isArmed, let f = FaultInjector.beforeWrite(path, offset: offset, count: total) {
            // An injected failure: the leading whole blocks it lets through, then the error.
            injected = f.errno
            total = f.prefix
        }
        #else
        let total = buffer.count
        #endif
        var done = 0
        while done < total {
            let n = pwriteCall(base + done, total - done, offset + UInt64(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw QCow2Error.io(path: path, operation: "write", errno: errno)
            }
            // pwrite of a regular file makes progress or fails; never spin on 0.
            if n == 0 { throw QCow2Error.io(path: path, operation: "write", errno: EIO) }
            done += n
            if let known = knownSize, offset + UInt64(done) > known { knownSize = offset + UInt64(done) }
        }
        #if QIMG_FAULT_INJECTION
        if let e = injected {
            if e == FaultPlan.kill { raise(SIGKILL) }
            throw QCow2Error.io(path: path, operation: "write", errno: e)
        }
        #endif
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
        #if QIMG_FAULT_INJECTION
        if FaultInjector.isArmed, let e = FaultInjector.beforeSync(path) {
            if e == FaultPlan.kill { raise(SIGKILL) }
            throw QCow2Error.io(path: path, operation: "fdatasync", errno: e)
        }
        #endif
        while syncCall(full: false) != 0 {
            if errno == EINTR { continue }
            throw QCow2Error.io(path: path, operation: "fdatasync", errno: errno)
        }
    }

    /// Sets the file length.
    public func truncate(to length: UInt64) throws {
        #if QIMG_FAULT_INJECTION
        if FaultInjector.isArmed, let f = FaultInjector.beforeWrite(path, offset: length, count: 0) {
            if f.errno == FaultPlan.kill { raise(SIGKILL) }
            throw QCow2Error.io(path: path, operation: "truncate", errno: f.errno)
        }
        #endif
        while ftruncate(fd, off_t(length)) != 0 {
            if errno == EINTR { continue }
            throw QCow2Error.io(path: path, operation: "truncate", errno: errno)
        }
        if knownSize != nil { knownSize = length }
    }

    /// Allocates disk blocks for [offset, offset+length) (fallocate mode 0); returns false
    /// when the file system cannot.
    public func preallocate(at offset: UInt64, length: UInt64) -> Bool {
        guard length > 0 else { return true }
        knownSize = nil
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
