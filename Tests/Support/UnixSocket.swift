import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Connects to the unix socket at `path`, retrying (every 20 ms) while the server that
/// will create it is `alive` and `deadline` (a backstop, not a time limit) is not past:
/// servers are waited for by polling their socket, never by a fixed sleep.
public func connectUnixSocket(_ path: String, alive: () -> Bool, deadline: Date = Date().addingTimeInterval(Runner.backstopSeconds)) throws -> Int32 {
    let bytes = Array(path.utf8)
    var addr = sockaddr_un()
    guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else {
        throw TestFailure("socket path too long: \(path)")
    }
    addr.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &addr.sun_path) { p in
        for (i, b) in bytes.enumerated() { p[i] = b }
        p[bytes.count] = 0
    }
    while true {
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard s >= 0 else { throw TestFailure("socket(): errno \(errno)") }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if rc == 0 { return s }
        let e = errno
        close(s)
        if !alive() || Date() > deadline { throw TestFailure("cannot connect to socket \(path): errno \(e)") }
        usleep(20_000)
    }
}
