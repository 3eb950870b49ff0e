#if canImport(Glibc)
import Glibc
#endif

/// The transport of QEMU's two JSON protocols on a unix socket: its monitor
/// (`QMPConnection`) and its guest agent's channel (`GuestAgent`) both take one JSON object
/// per line and answer with newline-terminated messages. Reads are bounded: a line of at
/// most `maxLine` bytes, waited for until a deadline (or without one). Every failure is
/// `QCow2Error.live` naming the socket, as the peer's problems say.
final class JSONLineSocket {
    /// Who is at the other end: how messages name it, and the problems its failures are.
    struct Peer {
        /// "the QMP socket"
        var socketName: String
        /// Who sent an unreadable message ("QEMU").
        var sender: String
        /// The detail of a session the peer ended.
        var closed: String
        /// An unreachable socket, a lost session.
        var unreachable: QCow2Error.LiveProblem
        /// An unreadable or oversized message.
        var garbled: QCow2Error.LiveProblem

        static let monitor = Peer(socketName: "the QMP socket", sender: "QEMU", closed: "QEMU closed the monitor connection",
                                  unreachable: .connection, garbled: .protocolError)
        static let guestAgent = Peer(socketName: "the guest agent's socket", sender: "the guest agent",
                                     closed: "QEMU closed the guest agent's channel", unreachable: .agentUnavailable, garbled: .agentFailed)
    }

    let path: String
    let peer: Peer
    private var fd: Int32 = -1
    private var received: [UInt8] = []
    private var chunk = [UInt8](repeating: 0, count: 64 * 1024)

    /// The longest line accepted (a reply to query-named-block-nodes grows with the number
    /// of nodes and bitmaps).
    static let maxLine = 32 * 1024 * 1024
    static let rules = JSONRules(maxDepth: 64, maxBytes: maxLine, refusesDuplicateKeys: false,
                                 refusesNUL: false, unsignedIntegersOnly: false)

    init(path: String, peer: Peer) throws(QCow2Error) {
        self.path = path
        self.peer = peer
        fd = try Self.open(path, peer)
    }

    deinit { close() }

    func close() {
        if fd >= 0 { Glibc.close(fd); fd = -1 }
    }

    func fail(_ p: QCow2Error.LiveProblem, _ detail: String) -> QCow2Error {
        .live(path: path, problem: p, detail: detail)
    }

    /// The next line that is not blank, without its newline; nil when `timeout`
    /// milliseconds pass before a whole line arrives (nil: no limit).
    func nextLine(timeout: Int?) throws(QCow2Error) -> [UInt8]? {
        let deadline = timeout.map { monotonicNanoseconds() + UInt64(max(0, $0)) * 1_000_000 }
        while true {
            if let nl = received.firstIndex(of: 0x0A) {
                let line = Array(received[..<nl])
                received.removeSubrange(...nl)
                if line.allSatisfy({ $0 == 0x20 || $0 == 0x0D || $0 == 0x09 }) { continue }
                return line
            }
            guard received.count < Self.maxLine else {
                throw fail(peer.garbled, "a message from \(peer.sender) is longer than \(Self.maxLine) bytes")
            }
            if let deadline {
                let now = monotonicNanoseconds()
                guard now < deadline else { return nil }
                // Not readable yet (or a signal): look at the deadline again.
                guard try waitReadable(Int((deadline - now) / 1_000_000) + 1) else { continue }
            }
            try fill()
        }
    }

    /// One message read by `nextLine`.
    func parse(_ line: [UInt8]) throws(QCow2Error) -> JSON {
        do { return try JSON.parse(line, rules: Self.rules) } catch {
            throw fail(peer.garbled, "unreadable message from \(peer.sender): \(error.detail)")
        }
    }

    func send(_ bytes: [UInt8]) throws(QCow2Error) {
        guard fd >= 0 else { throw fail(peer.unreachable, "the session is closed") }
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, $0.count - done, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { throw fail(peer.unreachable, "write failed: \(errnoDescription(errno))") }
            done += n
        }
    }

    private func waitReadable(_ milliseconds: Int) throws(QCow2Error) -> Bool {
        guard fd >= 0 else { throw fail(peer.unreachable, "the session is closed") }
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let rc = poll(&p, 1, Int32(clamping: milliseconds))
        if rc < 0 && errno != EINTR { throw fail(peer.unreachable, "poll failed: \(errnoDescription(errno))") }
        return rc > 0
    }

    private func fill() throws(QCow2Error) {
        guard fd >= 0 else { throw fail(peer.unreachable, "the session is closed") }
        var n: Int
        repeat { n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) } } while n < 0 && errno == EINTR
        if n == 0 || (n < 0 && errno == ECONNRESET) { throw fail(peer.unreachable, peer.closed) }
        if n < 0 { throw fail(peer.unreachable, "read failed: \(errnoDescription(errno))") }
        received.append(contentsOf: chunk[..<n])
    }

    private static func open(_ path: String, _ peer: Peer) throws(QCow2Error) -> Int32 {
        func failure(_ e: Int32) -> QCow2Error {
            .live(path: path, problem: peer.unreachable, detail: "cannot connect to \(peer.socketName): \(errnoDescription(e))")
        }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = PathCodec.encode(path)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity else {
            throw QCow2Error.live(path: path, problem: peer.unreachable, detail: "a socket path must be 1 to \(capacity - 1) bytes long")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw failure(errno) }
        var rc: Int32
        repeat {
            rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        } while rc < 0 && errno == EINTR
        guard rc == 0 else {
            let e = errno
            Glibc.close(fd)
            throw failure(e)
        }
        return fd
    }
}
