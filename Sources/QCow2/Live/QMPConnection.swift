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
/// A QEMU that stops answering (stopped, hung) must not hang a cron job: every reply is
/// waited for at most `replyTimeout` seconds, and a monitor that has been silent for a
/// while during `nextEvent` is asked `query-status` under the same limit. A reply that
/// does not come ends the session (`.connection`); later commands fail at once.
/// Every error is `QCow2Error.live` naming the socket.
public final class QMPConnection {
    public let socketPath: String
    /// Called for every event as it is read (before `nextEvent` returns it).
    public var onEvent: ((QMPEvent) -> Void)?
    private let channel: JSONLineSocket
    private var queued: [QMPEvent] = []
    private var nextID: UInt64 = 1
    /// Milliseconds a reply may take (see the type's comment).
    private let replyMilliseconds: Int
    /// When a message last arrived (monotonic nanoseconds).
    private var lastHeard: UInt64

    static let pollMilliseconds: Int32 = 100
    /// How long QEMU answers a command at most before the session counts as lost.
    public static let defaultReplyTimeout: Double = 60
    /// How long `nextEvent` listens to a silent monitor before it asks QEMU whether it
    /// still answers (milliseconds; at most the reply timeout).
    static let silenceMilliseconds = 10_000

    /// Connects, reads the greeting and negotiates capabilities.
    public init(socket path: String, greetingTimeout milliseconds: Int = 10_000,
                replyTimeout seconds: Double = QMPConnection.defaultReplyTimeout) throws(QCow2Error) {
        socketPath = path
        replyMilliseconds = Int(max(0.001, min(seconds, 1e6)) * 1000)
        lastHeard = monotonicNanoseconds()
        channel = try JSONLineSocket(path: path, peer: .monitor)
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

    public func close() { channel.close() }

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
        try channel.send(Array((JSON.object(message).rendered(indent: nil) + "\n").utf8))
        let deadline = monotonicNanoseconds() + UInt64(replyMilliseconds) * 1_000_000
        while true {
            let now = monotonicNanoseconds()
            let left = now < deadline ? Int((deadline - now) / 1_000_000) : 0
            guard let m = try readMessage(timeout: left) else {
                close()
                throw fail(.connection, "QEMU did not answer \(command) within \(Self.seconds(replyMilliseconds)) (is it stopped or hung?)")
            }
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
    /// A monitor silent for `silenceMilliseconds` is asked `query-status` (see the type).
    public func nextEvent(stopping stop: () -> Bool = { false }) throws(QCow2Error) -> QMPEvent? {
        let silence = UInt64(min(Self.silenceMilliseconds, replyMilliseconds)) * 1_000_000
        while queued.isEmpty {
            if stop() { return nil }
            _ = try readMessage(timeout: Int(Self.pollMilliseconds))
            if queued.isEmpty && monotonicNanoseconds() - lastHeard >= silence { _ = try tryExecute("query-status") }
        }
        return queued.removeFirst()
    }

    static func seconds(_ milliseconds: Int) -> String {
        milliseconds % 1000 == 0 ? "\(milliseconds / 1000) s" : "\(Double(milliseconds) / 1000) s"
    }

    // MARK: - Transport

    /// Reads one message (an event is queued and returned too); nil when `timeout`
    /// (milliseconds) passes without a whole line.
    private func readMessage(timeout: Int?) throws(QCow2Error) -> JSON? {
        guard let line = try channel.nextLine(timeout: timeout) else { return nil }
        lastHeard = monotonicNanoseconds()
        let m = try channel.parse(line)
        if case .string(let name)? = m["event"] {
            let event = QMPEvent(name: name, data: m["data"] ?? .object([]))
            queued.append(event)
            onEvent?(event)
        }
        return m
    }
}
