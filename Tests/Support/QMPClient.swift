import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A minimal QMP client over a unix socket. Its waits have no deadline that a loaded
/// machine could reach: connecting retries while the daemon is `alive`, and reads end
/// when the daemon closes the connection; `Runner.backstopSeconds` only guards a hang.
public final class QMPClient {
    private let fd: Int32
    private var pending: [UInt8] = []
    private var events: [[String: Any]] = []

    public init(socketPath: String, alive: () -> Bool) throws {
        let timeout = Runner.backstopSeconds
        let deadline = Date().addingTimeInterval(timeout)
        fd = try connectUnixSocket(socketPath, alive: alive, deadline: deadline)
        let greeting = try readMessage(timeout: timeout)
        guard greeting["QMP"] != nil else { throw TestFailure("unexpected QMP greeting: \(greeting)") }
        _ = try execute("qmp_capabilities")
    }

    deinit { close(fd) }

    private func readMessage(timeout: Double) throws -> [String: Any] {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if let nl = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Data(pending[..<nl])
                pending.removeSubrange(...nl)
                if line.allSatisfy({ $0 == 32 || $0 == 13 }) { continue }
                guard let obj = try JSONSerialization.jsonObject(with: line) as? [String: Any] else {
                    throw TestFailure("QMP: not an object: \(String(decoding: line, as: UTF8.self))")
                }
                return obj
            }
            let left = deadline.timeIntervalSinceNow
            guard left > 0 else { throw TestFailure("QMP: timed out waiting for a message") }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, Int32(min(left * 1000, 1000)) + 1)
            if r < 0 && errno == EINTR { continue }
            if r <= 0 { continue }
            var buf = [UInt8](repeating: 0, count: 65536)
            let n = read(fd, &buf, buf.count)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw TestFailure("QMP: connection closed") }
            pending.append(contentsOf: buf[0..<n])
        }
    }

    /// Sends a command and returns its "return" value; a QMP error throws.
    @discardableResult
    public func execute(_ name: String, _ arguments: [String: Any]? = nil, timeout: Double = Runner.backstopSeconds) throws -> Any {
        var msg: [String: Any] = ["execute": name]
        if let arguments { msg["arguments"] = arguments }
        var data = try JSONSerialization.data(withJSONObject: msg)
        data.append(UInt8(ascii: "\n"))
        try data.withUnsafeBytes { p in
            var off = 0
            while off < p.count {
                let n = write(fd, p.baseAddress! + off, p.count - off)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw TestFailure("QMP: write failed: errno \(errno)") }
                off += n
            }
        }
        while true {
            let m = try readMessage(timeout: timeout)
            if let r = m["return"] { return r }
            if let e = m["error"] { throw TestFailure("QMP \(name) failed: \(e)") }
            events.append(m)
        }
    }

    /// Waits for an event (possibly already received) and returns its data.
    public func waitForEvent(_ name: String, timeout: Double = Runner.backstopSeconds) throws -> [String: Any] {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if let i = events.firstIndex(where: { $0["event"] as? String == name }) {
                return events.remove(at: i)["data"] as? [String: Any] ?? [:]
            }
            let left = deadline.timeIntervalSinceNow
            guard left > 0 else { throw TestFailure("QMP: no \(name) event within \(timeout) s") }
            events.append(try readMessage(timeout: left))
        }
    }
}
