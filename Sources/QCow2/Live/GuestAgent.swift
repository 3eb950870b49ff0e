/// A session with the QEMU guest agent (qemu-ga inside the guest) through the host end of
/// its channel: the unix socket of a QEMU `-chardev socket,...,server=on` behind a
/// `virtserialport` named `org.qemu.guest_agent.0`. The agent reads one JSON command per
/// line and answers each in turn, without a greeting; QEMU accepts the connection whether
/// or not an agent runs in the guest, and the channel may still hold bytes of an earlier
/// client. So the session starts with `guest-sync-delimited`: a 0xFF byte (which resets the
/// agent's parser), then the command with a random id; everything the agent sent before its
/// own 0xFF, and every answer that does not carry that id, is dropped. Every wait is
/// bounded; nothing answering in time is `.agentUnavailable`, a refused command
/// `.agentFailed` (`QCow2Error.live` naming the socket).
public final class GuestAgent {
    public let socketPath: String
    private let channel: JSONLineSocket
    private var nextID: UInt64 = 1

    /// How long the agent is given to answer the synchronisation.
    public static let syncTimeout = 10_000

    /// Connects and synchronises the channel (at most `syncTimeout` milliseconds).
    public init(socket path: String, syncTimeout milliseconds: Int = GuestAgent.syncTimeout) throws(QCow2Error) {
        socketPath = path
        channel = try JSONLineSocket(path: path, peer: .guestAgent)
        do { try synchronise(milliseconds) } catch {
            channel.close()
            throw error
        }
    }

    public func close() { channel.close() }

    func fail(_ p: QCow2Error.LiveProblem, _ detail: String) -> QCow2Error { channel.fail(p, detail) }

    /// Runs `command` and returns its `return` value; the agent's refusal is `.agentFailed`
    /// with its description, no answer within `timeout` milliseconds `.agentUnavailable`.
    @discardableResult
    public func execute(_ command: String, _ arguments: [(String, JSON)]? = nil, timeout: Int) throws(QCow2Error) -> JSON {
        let id = "qimg-\(nextID)"
        nextID += 1
        try send(command, arguments, id: .string(id))
        let deadline = monotonicNanoseconds() + UInt64(max(0, timeout)) * 1_000_000
        while true {
            guard let line = try channel.nextLine(timeout: Self.left(deadline)) else {
                throw fail(.agentUnavailable, "the guest agent did not answer \(command) within \(Self.seconds(timeout))")
            }
            let m = try channel.parse(Self.afterDelimiter(line) ?? line)
            // The agent echoes the id; an answer without one can only be to this command.
            guard m["id"] == nil || m["id"] == .string(id) else { continue }
            if let r = m["return"] { return r }
            var description = "no reason given"
            if case .string(let d)? = m["error"]?["desc"] { description = d }
            throw fail(.agentFailed, "\(command): \(description)")
        }
    }

    /// `guest-sync-delimited` with a random id: drops what an earlier client left unread.
    private func synchronise(_ milliseconds: Int) throws(QCow2Error) {
        let token = UInt64(UInt32.random(in: 1...UInt32.max))
        try channel.send([0xFF])
        try send("guest-sync-delimited", [("id", .uint(token))], id: nil)
        let deadline = monotonicNanoseconds() + UInt64(max(0, milliseconds)) * 1_000_000
        var delimited = false
        while true {
            guard let line = try channel.nextLine(timeout: Self.left(deadline)) else {
                throw fail(.agentUnavailable, "no guest agent answered within \(Self.seconds(milliseconds)) (is qemu-ga running in the guest? is another client connected to this channel?)")
            }
            let rest = Self.afterDelimiter(line)
            delimited = delimited || rest != nil
            // Lines before the agent's delimiter are an earlier session's (possibly cut short).
            guard delimited, let m = try? channel.parse(rest ?? line) else { continue }
            if m["return"]?.uint64 == token { return }
        }
    }

    private func send(_ command: String, _ arguments: [(String, JSON)]?, id: JSON?) throws(QCow2Error) {
        var message: [(String, JSON)] = [("execute", .string(command))]
        if let arguments { message.append(("arguments", .object(arguments))) }
        if let id { message.append(("id", id)) }
        try channel.send(Array((JSON.object(message).rendered(indent: nil) + "\n").utf8))
    }

    /// The bytes after the last 0xFF of `line` (the agent's delimiter), or nil without one.
    private static func afterDelimiter(_ line: [UInt8]) -> [UInt8]? {
        line.lastIndex(of: 0xFF).map { Array(line[($0 + 1)...]) }
    }

    private static func left(_ deadline: UInt64) -> Int {
        let now = monotonicNanoseconds()
        return now >= deadline ? 0 : Int((deadline - now) / 1_000_000)
    }

    private static func seconds(_ milliseconds: Int) -> String {
        milliseconds % 1000 == 0 ? "\(milliseconds / 1000) s" : "\(Double(milliseconds) / 1000) s"
    }
}
