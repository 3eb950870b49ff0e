#if canImport(Glibc)
import Glibc
#endif

/// How an image is locked against other openers.
public enum LockMode: Sendable {
    /// Force-share (`-U`): take no locks and test for none.
    case none
    /// A reader that forbids other writers and resizers (like `qemu-io -r`).
    case read
    /// A writer that forbids other writers and resizers (like `qemu-io`).
    case write
}

/// QEMU-compatible image locking (the scheme of QEMU's file driver).
///
/// All locks are shared (`F_RDLCK`) one-byte Linux open file description
/// locks. Byte `100 + i` means "I hold permission i", byte `200 + i` means
/// "I do not let others hold permission i", for i = 0 consistent read,
/// 1 write, 2 write-unchanged, 3 resize. Since no lock is exclusive, a
/// conflict is found by testing (`F_OFD_GETLK` with `F_WRLCK`) whether any
/// *other* open file description holds a byte.
///
/// The class holds nothing itself: the locks belong to the open file
/// description of `fd`, so they last until `release(fd:)` or until the last
/// descriptor sharing that description is closed. Locks taken through one
/// description DO conflict with those of another description of the same
/// file, even within this process (open the image once per process).
///
/// When the filesystem does not support OFD locks (`EINVAL`, e.g. some
/// network filesystems), `acquire` proceeds without locking. QEMU instead
/// falls back to process-wide POSIX locks; those are dropped whenever the
/// process closes any descriptor of the file, so they are not used here.
public final class ImageLock {
    // <fcntl.h> only exposes these under _GNU_SOURCE; Linux values.
    static let getLock: Int32 = 36  // F_OFD_GETLK
    static let setLock: Int32 = 37  // F_OFD_SETLK

    static let haveConsistentRead: Int64 = 100
    static let haveWrite: Int64 = 101
    static let haveResize: Int64 = 103
    static let denyConsistentRead: Int64 = 200
    static let denyWrite: Int64 = 201
    static let denyResize: Int64 = 203
    /// The whole range QEMU uses (100...103 and 200...203, plus the gap).
    static let rangeStart: Int64 = 100
    static let rangeEnd: Int64 = 203
    /// Every byte QEMU (7.2) may lock.
    static let allBytes: [Int64] = [100, 101, 102, 103, 200, 201, 202, 203]
    /// qimg's own mark, outside QEMU's bytes: "a qimg holds this image" (shared lock), so
    /// that a refused opener can say whether the holder is another qimg or QEMU.
    static let qimgMark: Int64 = 1025

    private init() {}

    /// The bytes locked for `mode`, and the bytes others must not hold.
    static func plan(_ mode: LockMode) -> (lock: [Int64], mustBeFree: [Int64]) {
        switch mode {
        case .none:
            return ([], [])
        case .read:
            return ([haveConsistentRead, denyWrite, denyResize],
                    [denyConsistentRead, haveWrite, haveResize])
        case .write:
            return ([haveConsistentRead, haveWrite, haveResize, denyWrite, denyResize],
                    [denyConsistentRead, denyWrite, denyResize, haveWrite, haveResize])
        }
    }

    /// Takes QEMU's locks for `mode` on `fd` (the image file opened by us),
    /// after testing for conflicting holders.
    ///
    /// * write: locks 100, 101, 103, 201, 203; conflicts when another
    ///   holder has 200/201/203 (denies what we want) or 101/103 (holds
    ///   what we deny).
    /// * read: locks 100, 201, 203; conflicts when another holder has 200,
    ///   101 or 103.
    /// * none: no locks, no tests.
    ///
    /// Order: test, then set, then test again (closes the window in which
    /// another opener could test and set between our test and our set; with
    /// shared locks setting never fails on its own). If the second test
    /// finds a conflict, the bytes are unlocked again. Bytes of the range
    /// that `mode` does not use are unlocked, so a write lock can be
    /// downgraded to a read lock by calling `acquire` again.
    public static func acquire(fd: Int32, path: String, mode: LockMode) throws {
        let (bytes, mustBeFree) = plan(mode)
        if bytes.isEmpty { return }

        // 1. Test.
        switch try firstHeld(fd: fd, path: path, bytes: mustBeFree) {
        case .unsupported: return
        case .held(let byte): throw conflict(path: path, mode: mode, fd: fd, firstByte: byte)
        case .free: break
        }

        // 2. Set.
        for byte in bytes {
            switch try setRange(fd: fd, path: path, type: F_RDLCK, start: byte, length: 1) {
            case .ok: break
            case .unsupported: return
            case .conflict:
                unlock(fd: fd, bytes: bytes)
                throw conflict(path: path, mode: mode, fd: fd, firstByte: byte)
            }
        }
        unlock(fd: fd, bytes: allBytes.filter { !bytes.contains($0) })
        _ = try? setRange(fd: fd, path: path, type: F_RDLCK, start: qimgMark, length: 1)

        // 3. Test again, now that others can see our locks.
        if case .held(let byte) = try firstHeld(fd: fd, path: path, bytes: mustBeFree) {
            unlock(fd: fd, bytes: bytes)
            throw conflict(path: path, mode: mode, fd: fd, firstByte: byte)
        }
    }

    /// Unlocks the bytes 100...203 of `fd`'s open file description.
    /// Errors are ignored (closing the description drops the locks anyway).
    public static func release(fd: Int32) {
        _ = try? setRange(fd: fd, path: "", type: F_UNLCK, start: rangeStart,
                          length: rangeEnd - rangeStart + 1)
        _ = try? setRange(fd: fd, path: "", type: F_UNLCK, start: qimgMark, length: 1)
    }

    // MARK: - fcntl

    enum TestResult: Equatable { case free, held(Int64), unsupported }
    enum SetResult: Equatable { case ok, conflict, unsupported }

    static func makeFlock(type: Int32, start: Int64, length: Int64) -> flock {
        var fl = flock()
        fl.l_type = Int16(type)
        fl.l_whence = Int16(SEEK_SET)
        fl.l_start = off_t(start)
        fl.l_len = off_t(length)
        fl.l_pid = 0  // required by OFD commands
        return fl
    }

    /// The first byte of `bytes` that another open file description holds.
    static func firstHeld(fd: Int32, path: String, bytes: [Int64]) throws -> TestResult {
        for byte in bytes {
            var fl = makeFlock(type: F_WRLCK, start: byte, length: 1)
            var rc: Int32
            repeat { rc = fcntl(fd, getLock, &fl) } while rc < 0 && errno == EINTR
            if rc < 0 {
                let e = errno
                if e == EINVAL { return .unsupported }
                throw QCow2Error.io(path: path, operation: "fcntl(F_OFD_GETLK)", errno: e)
            }
            if Int32(fl.l_type) != F_UNLCK { return .held(byte) }
        }
        return .free
    }

    /// Is `byte` held by another open file description? (false when unknown)
    static func heldByOthers(fd: Int32, byte: Int64) -> Bool {
        if case .held = (try? firstHeld(fd: fd, path: "", bytes: [byte])) ?? .free { return true }
        return false
    }

    static func setRange(fd: Int32, path: String, type: Int32, start: Int64, length: Int64) throws -> SetResult {
        var fl = makeFlock(type: type, start: start, length: length)
        var rc: Int32
        repeat { rc = fcntl(fd, setLock, &fl) } while rc < 0 && errno == EINTR
        if rc == 0 { return .ok }
        let e = errno
        switch e {
        case EAGAIN, EACCES: return .conflict
        case EINVAL: return .unsupported
        default: throw QCow2Error.io(path: path, operation: "fcntl(F_OFD_SETLK)", errno: e)
        }
    }

    static func unlock(fd: Int32, bytes: [Int64]) {
        for byte in bytes {
            _ = try? setRange(fd: fd, path: "", type: F_UNLCK, start: byte, length: 1)
        }
    }

    static func conflict(path: String, mode: LockMode, fd: Int32, firstByte: Int64) -> QCow2Error {
        let holder = LockHolder.find(fd: fd, bytes: allBytes)
        switch mode {
        case .write:
            // A QEMU writer holds the "write" byte: reading without locks still works.
            let writer = firstByte == haveWrite || heldByOthers(fd: fd, byte: haveWrite)
            return .inUse(path: path, holder: holder, readOnlyShareWorks: writer)
        case .read, .none:
            return .inUse(path: path, holder: holder, readOnlyShareWorks: true)
        }
    }
}

/// Who holds an image's locks, as far as this process can tell: another qimg (it holds
/// qimg's mark byte), a VM (qemu-system-*), a QEMU tool, or an unknown process; with
/// its pid and program name when /proc shows them (the lock lines of /proc/PID/fdinfo).
public struct LockHolder: Equatable, Sendable, CustomStringConvertible {
    public var isQimg: Bool
    public var pid: Int32?
    public var program: String?

    public var isVM: Bool { program?.hasPrefix("qemu-system") == true }

    public var description: String {
        let pidText = pid.map { "pid \($0)" }
        if isQimg { return "another qimg" + (pidText.map { " (\($0))" } ?? "") }
        guard let program else { return "another process (a VM or a QEMU tool?)" }
        let withPid = program + (pidText.map { " (\($0))" } ?? "")
        return isVM ? "a running VM (\(program)" + (pidText.map { ", \($0)" } ?? "") + ")" : withPid
    }

    static func find(fd: Int32, bytes: [Int64]) -> LockHolder {
        let isQimg = ImageLock.heldByOthers(fd: fd, byte: ImageLock.qimgMark)
        var st = stat()
        guard fstat(fd, &st) == 0 else { return LockHolder(isQimg: isQimg) }
        let pid = holderPid(device: UInt64(st.st_dev), inode: UInt64(st.st_ino), bytes: bytes)
        return LockHolder(isQimg: isQimg, pid: pid, program: pid.flatMap(programName))
    }

    init(isQimg: Bool, pid: Int32? = nil, program: String? = nil) {
        self.isQimg = isQimg
        self.pid = pid
        self.program = program
    }

    /// The first other process whose open file holds a lock on one of `bytes` of the file.
    static func holderPid(device: UInt64, inode: UInt64, bytes: [Int64]) -> Int32? {
        let major = ((device >> 8) & 0xfff) | ((device >> 32) & ~UInt64(0xfff))
        let minor = (device & 0xff) | ((device >> 12) & ~UInt64(0xff))
        let key = " " + hex2(major) + ":" + hex2(minor) + ":\(inode) "
        let me = getpid()
        for pid in numericEntries("/proc") where pid != me {
            for fdNumber in numericEntries("/proc/\(pid)/fdinfo") {
                guard let text = readSmallFile("/proc/\(pid)/fdinfo/\(fdNumber)"), text.contains(key) else { continue }
                for line in text.split(separator: "\n") where line.hasPrefix("lock:") && line.contains(key) {
                    let f = line.split(separator: " ", omittingEmptySubsequences: true)
                    guard f.count >= 2, let lo = Int64(f[f.count - 2]) else { continue }
                    let hi = f.last == "EOF" ? Int64.max : Int64(f[f.count - 1]) ?? lo
                    if bytes.contains(where: { (lo...hi).contains($0) }) { return pid }
                }
            }
        }
        return nil
    }

    static func hex2(_ v: UInt64) -> String {
        let s = String(v, radix: 16)
        return s.count < 2 ? "0" + s : s
    }

    static func programName(_ pid: Int32) -> String? {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/\(pid)/exe", &buf, buf.count - 1)
        if n > 0 {
            let full = String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
            return String(full.split(separator: "/").last ?? Substring(full))
        }
        return readSmallFile("/proc/\(pid)/comm").map { String($0.split(separator: "\n").first ?? "") }
    }

    static func numericEntries(_ dir: String) -> [Int32] {
        guard let d = opendir(dir) else { return [] }
        defer { closedir(d) }
        var out: [Int32] = []
        while let e = readdir(d) {
            if let n = Int32(Sys.name(of: e)) { out.append(n) }
        }
        return out
    }

    static func readSmallFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var buf = [UInt8](repeating: 0, count: 8192)
        var total = 0
        while total < buf.count {
            let n = buf.withUnsafeMutableBytes { read(fd, $0.baseAddress! + total, $0.count - total) }
            if n <= 0 { break }
            total += n
        }
        return String(decoding: buf[0..<total], as: UTF8.self)
    }
}
