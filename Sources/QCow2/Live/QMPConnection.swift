#if canImport(Glibc)
import Glibc
#endif

/// An asynchronous QMP event (`{"event": NAME, "data": {...}}`).
public struct QMPEvent: Sendable {
    public var name: String
    public var data: JSON

    /// The job a job event is about (`id` in JOB_STATUS_CHANGE, `device` in BLOCK_JOB_*).
    public var job: String? {
        if case .string(let s)? = data["id"] { return s }
        if case .string(let s)? = data["device"] { return s }
        return nil
    }
}

/// One session with a running QEMU's monitor (QMP) over a unix socket: the greeting,
/// capabilities negotiation, commands matched to their replies by `id`, and the events
/// that arrive in between (kept in order for `nextEvent` and passed to `onEvent`).
///
/// QEMU serves one client per monitor: a second client gets no greeting until the
/// first one leaves, so `connect` waits for the greeting at most `greetingTimeout`.
/// Every error is `QCow2Error.live` naming the socket.
public final class QMPConnection {
    public let socketPath: String
    /// Called for every event as it is read (before `nextEvent` returns it).
    public var onEvent: ((QMPEvent) -> Void)?
    private var fd: Int32 = -1
    private var received: [UInt8] = []
    private var chunk = [UInt8](repeating: 0, count: 64 * 1024)
    private var queued: [QMPEvent] = []
    private var nextID: UInt64 = 1

    /// The longest line accepted from QEMU (a reply to query-named-block-nodes grows with
    /// the number of nodes and bitmaps).
    static let maxLine = 32 * 1024 * 1024
    static let pollMilliseconds: Int32 = 100
    static let rules = JSONRules(maxDepth: 64, maxBytes: maxLine, refusesDuplicateKeys: false,
                                 refusesNUL: false, unsignedIntegersOnly: false)

    /// Connects, reads the greeting and negotiates capabilities.
    public init(socket path: String, greetingTimeout milliseconds: Int = 10_000) throws(QCow2Error) {
        socketPath = path
        fd = try Self.open(path)
        do throws(QCow2Error) {
            guard let greeting = try readMessage(timeout: milliseconds) else {
                throw fail(.connection, "no QMP greeting (another client is connected to this monitor?)")
            }
            guard greeting["QMP"] != nil else { throw fail(.protocolError, "not a QMP monitor (no greeting)") }
            _ = try execute("qmp_capabilities")
        } catch {
            close()
            throw error
        }
    }

    deinit { close() }

    public func close() {
        if fd >= 0 { Glibc.close(fd); fd = -1 }
    }

    func fail(_ p: QCow2Error.LiveProblem, _ detail: String) -> QCow2Error {
        .live(path: socketPath, problem: p, detail: detail)
    }

    // MARK: - Commands and events

    /// Runs `command`; returns its `return` value. A QMP error reply is `.protocolError`
    /// with QEMU's description (callers that expect a refusal use `tryExecute`).
    @discardableResult
    public func execute(_ command: String, _ arguments: [(String, JSON)]? = nil) throws(QCow2Error) -> JSON {
        switch try tryExecute(command, arguments) {
        case .success(let v): return v
        case .failure(let e): throw fail(.protocolError, "\(command): \(e.description)")
        }
    }

    /// QEMU's refusal of a command: its error class and description.
    public struct Refusal: Error, Sendable {
        public var errorClass: String
        public var description: String
    }

    /// Runs `command`: its `return` value, or QEMU's refusal. Session failures throw.
    public func tryExecute(_ command: String, _ arguments: [(String, JSON)]? = nil) throws(QCow2Error) -> Result<JSON, Refusal> {
        let id = "qimg-\(nextID)"
        nextID += 1
        var message: [(String, JSON)] = [("execute", .string(command))]
        if let arguments { message.append(("arguments", .object(arguments))) }
        message.append(("id", .string(id)))
        try send(JSON.object(message).rendered(indent: nil) + "\n")
        while true {
            guard let m = try readMessage(timeout: nil) else { continue }
            guard m["id"] == .string(id) else { continue }   // an unrelated reply (e.g. to a bad line)
            if let r = m["return"] { return .success(r) }
            guard let e = m["error"] else { throw fail(.protocolError, "\(command): a reply with neither return nor error") }
            var refusal = Refusal(errorClass: "", description: "")
            if case .string(let c)? = e["class"] { refusal.errorClass = c }
            if case .string(let d)? = e["desc"] { refusal.description = d }
            return .failure(refusal)
        }
    }

    /// The next event (queued ones first). Waits until one arrives, or returns nil as soon
    /// as `stop` answers true (asked every `pollMilliseconds`).
    public func nextEvent(stopping stop: () -> Bool = { false }) throws(QCow2Error) -> QMPEvent? {
        while queued.isEmpty {
            if stop() { return nil }
            _ = try readMessage(timeout: Int(Self.pollMilliseconds))
        }
        return queued.removeFirst()
    }

    // MARK: - Transport

    /// Reads one message (an event is queued and returned too); nil when `timeout`
    /// (milliseconds) passes without a whole line.
    private func readMessage(timeout: Int?) throws(QCow2Error) -> JSON? {
        while true {
            if let nl = received.firstIndex(of: 0x0A) {
                let line = Array(received[..<nl])
                received.removeSubrange(...nl)
                if line.allSatisfy({ $0 == 0x20 || $0 == 0x0D || $0 == 0x09 }) { continue }
                let m: JSON
                do { m = try JSON.parse(line, rules: Self.rules) } catch {
                    throw fail(.protocolError, "unreadable message from QEMU: \(error.detail)")
                }
                if case .string(let name)? = m["event"] {
                    let event = QMPEvent(name: name, data: m["data"] ?? .object([]))
                    queued.append(event)
                    onEvent?(event)
                }
                return m
            }
            guard received.count < Self.maxLine else { throw fail(.protocolError, "a message from QEMU is longer than \(Self.maxLine) bytes") }
            if let timeout, !(try waitReadable(timeout)) { return nil }
            try fill()
        }
    }

    private func waitReadable(_ milliseconds: Int) throws(QCow2Error) -> Bool {
        guard fd >= 0 else { throw fail(.connection, "the session is closed") }
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let rc = poll(&p, 1, Int32(clamping: milliseconds))
        if rc < 0 && errno != EINTR { throw fail(.connection, "poll failed: \(errnoDescription(errno))") }
        return rc > 0
    }

    private func fill() throws(QCow2Error) {
        guard fd >= 0 else { throw fail(.connection, "the session is closed") }
        var n: Int
        repeat { n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) } } while n < 0 && errno == EINTR
        if n == 0 || (n < 0 && errno == ECONNRESET) { throw fail(.connection, "QEMU closed the monitor connection") }
        if n < 0 { throw fail(.connection, "read failed: \(errnoDescription(errno))") }
        received.append(contentsOf: chunk[..<n])
    }

    private func send(_ text: String) throws(QCow2Error) {
        guard fd >= 0 else { throw fail(.connection, "the session is closed") }
        let bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, $0.count - done, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { throw fail(.connection, "write failed: \(errnoDescription(errno))") }
            done += n
        }
    }

    private static func open(_ path: String) throws(QCow2Error) -> Int32 {
        func failure(_ e: Int32) -> QCow2Error { .live(path: path, problem: .connection, detail: "cannot connect to the QMP socket: \(errnoDescription(e))") }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = PathCodec.encode(path)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity else {
            throw QCow2Error.live(path: path, problem: .connection, detail: "a socket path must be 1 to \(capacity - 1) bytes long")
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
