import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Whether /proc/locks shows a lock covering `byte` of the file with inode `inode`.
public func lockHeld(inode: UInt64, byte: Int) -> Bool {
    let text = (try? String(contentsOfFile: "/proc/locks", encoding: .utf8)) ?? ""
    for line in text.split(separator: "\n") {
        // "1: OFDLCK ADVISORY  READ -1 fe:00:16220299 100 101" (adjacent bytes are merged)
        let f = line.split(separator: " ", omittingEmptySubsequences: true)
        guard f.count >= 8, f[5].hasSuffix(":\(inode)"), let lo = Int(f[6]) else { continue }
        let hi = f[7] == "EOF" ? Int.max : Int(f[7]) ?? -1
        if (lo...max(lo, hi)).contains(byte) { return true }
    }
    return false
}

/// Waits (up to `timeout` seconds) until /proc/locks shows a lock covering `byte`
/// of the file at `path` (matched by inode); `alive` is polled to stop early.
public func waitForLock(on path: String, byte: Int, timeout: Double = 10,
                        alive: () -> Bool = { true }) throws {
    var st = stat()
    guard stat(path, &st) == 0 else { throw TestFailure("stat \(path): errno \(errno)") }
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if lockHeld(inode: UInt64(st.st_ino), byte: byte) { return }
        guard alive() else { throw TestFailure("the lock holder ended before locking byte \(byte) of \(path)") }
        usleep(1_000)
    }
    throw TestFailure("no lock on byte \(byte) of \(path) after \(timeout) s")
}
