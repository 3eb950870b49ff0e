/// A live backup's start with the guest's filesystems frozen through its agent, so that the
/// point in time holds every write the guest's applications had made (application
/// consistency instead of a power cut's). The filesystems are frozen
/// (`guest-fsfreeze-freeze`: the guest flushes them and blocks new writes) only around the
/// one QMP command that fixes the point in time (the transaction that starts the backup
/// jobs or creates the view) and thawed right after its reply, on every path: the command
/// failing, a stop request, the monitor gone.
///
/// A run killed while the guest was frozen leaves it frozen (nothing in the guest thaws it
/// by itself); `connect`, which each run calls before it starts anything, finds that
/// (`guest-fsfreeze-status`) and thaws it first (`thawedLeftover`).
public final class GuestFreeze {
    /// The host end of the agent's channel.
    public let socket: String
    private var session: GuestAgent?
    /// Filesystems an earlier run had left frozen, thawed when this session started.
    public private(set) var thawedLeftover: Int?
    /// Filesystems frozen for the start of this backup (nil: not frozen yet).
    public private(set) var frozen: Int?
    /// How long they were frozen.
    public private(set) var frozenSeconds = 0.0

    /// How long freezing (the guest writes its dirty data out) or thawing may take.
    public static let timeout = 120_000

    public init(socket: String) { self.socket = socket }

    /// Connects and synchronises (a guest without an agent is an error here, before
    /// anything is frozen), and thaws a guest left frozen; once per session.
    public func connect() throws(QCow2Error) {
        guard session == nil else { return }
        session = try GuestAgent(socket: socket)
        if try status() == "frozen" { thawedLeftover = try thaw() }
    }

    /// `guest-fsfreeze-status`: "thawed" or "frozen".
    public func status() throws(QCow2Error) -> String {
        guard case .string(let s) = try agent().execute("guest-fsfreeze-status", timeout: Self.timeout) else {
            throw fail(.agentFailed, "guest-fsfreeze-status: the answer is not a status")
        }
        return s
    }

    private func agent() throws(QCow2Error) -> GuestAgent {
        if let session { return session }
        try connect()
        guard let session else { throw fail(.agentUnavailable, "no session") }
        return session
    }

    func fail(_ p: QCow2Error.LiveProblem, _ detail: String) -> QCow2Error { .live(path: socket, problem: p, detail: detail) }

    /// Runs `body` with the guest's filesystems frozen, and thaws them whatever happens.
    /// Throws (after thawing) the freeze's failure or a stop request (`body` did not run),
    /// or `body`'s error; a failed thaw after that is the error thrown instead, since the
    /// guest may still be frozen. When `body` succeeded and only the thaw failed, returns
    /// the thaw's error: `body`'s effect stands and the caller undoes it.
    func around(stop: () -> Bool, _ body: () throws -> Void) throws -> QCow2Error? {
        var failure: Error?
        var started: UInt64 = 0
        do {
            frozen = try count(agent().execute("guest-fsfreeze-freeze", timeout: Self.timeout), "guest-fsfreeze-freeze")
            started = monotonicNanoseconds()
            if stop() { throw fail(.cancelled, "cancelled while the guest's filesystems were frozen; nothing was started") }
            try body()
        } catch { failure = error }   // a freeze that failed or timed out is thawed too
        do { _ = try thaw() } catch {
            return try thawFailed(error, after: failure)
        }
        if started > 0 { frozenSeconds = Double(monotonicNanoseconds() - started) / 1e9 }
        if let failure { throw failure }
        return nil
    }

    /// Runs `body` inside `freeze.around` or, without a freeze, as it is.
    static func bracket(_ freeze: GuestFreeze?, stop: () -> Bool, _ body: () throws -> Void) throws -> QCow2Error? {
        guard let freeze else {
            try body()
            return nil
        }
        return try freeze.around(stop: stop, body)
    }

    private func thaw() throws(QCow2Error) -> Int {
        try count(agent().execute("guest-fsfreeze-thaw", timeout: Self.timeout), "guest-fsfreeze-thaw")
    }

    private func thawFailed(_ error: QCow2Error, after failure: Error?) throws -> QCow2Error {
        let before = (failure as? QCow2Error).map { " (after: \($0.message))" } ?? ""
        let e = fail(.agentFailed, "could not thaw the guest's filesystems: \(error.message)\(before); they may still be frozen until an agent session thaws them (the next backup run that freezes does so first)")
        if failure != nil { throw e }
        return e
    }

    private func count(_ reply: JSON, _ command: String) throws(QCow2Error) -> Int {
        guard let n = reply.uint64, n <= UInt64(Int.max) else { throw fail(.agentFailed, "\(command): the answer is not a count") }
        return Int(n)
    }
}
