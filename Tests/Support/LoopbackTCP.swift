import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// TCP on 127.0.0.1 for servers a test starts (qemu-nbd -p).
public enum LoopbackTCP {
    /// A port nobody listens on now: bound to port 0 and released (a server started right
    /// after takes it).
    public static func freePort() throws -> UInt16 {
        let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard s >= 0 else { throw TestFailure("socket(): errno \(errno)") }
        defer { close(s) }
        var addr = address(0)
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let rc = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { p in bind(s, p, len) == 0 ? getsockname(s, p, &len) : -1 }
        }
        guard rc == 0 else { throw TestFailure("bind/getsockname on 127.0.0.1: errno \(errno)") }
        return UInt16(bigEndian: addr.sin_port)
    }

    /// Waits until something accepts connections on `port` (the probe is closed at once),
    /// or fails once `alive` turns false.
    public static func waitForListener(_ port: UInt16, alive: () -> Bool) throws {
        var addr = address(port)
        while true {
            let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            guard s >= 0 else { throw TestFailure("socket(): errno \(errno)") }
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            close(s)
            if rc == 0 { return }
            if !alive() { throw TestFailure("nothing listens on 127.0.0.1:\(port)") }
            usleep(20_000)
        }
    }

    static func address(_ port: UInt16) -> sockaddr_in {
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = port.bigEndian
        addr.sin_addr.s_addr = UInt32(0x7f00_0001).bigEndian
        return addr
    }
}
