import Foundation
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// A relay between one client (qimg) and the guest agent's socket, on a thread: bytes pass
/// unchanged both ways, except that the agent's answer to the client's
/// `guest-fsfreeze-freeze` is held while `onFrozen` runs (the guest is frozen then, and the
/// client is between its freeze and its thaw); what it returns says what happens next.
final class AgentRelay: @unchecked Sendable {
    enum Next {
        /// The answer passes and the relay goes on.
        case pass
        /// Nothing passes any more; the relay ends when the client goes.
        case hold
        /// The answer passes, then the relay closes both ends (the client cannot thaw).
        case passThenCut
    }

    let path: String
    private let listener: Int32
    private let onFrozen: @Sendable () -> Next

    init(path: String, agent: String, onFrozen: @escaping @Sendable () -> Next) throws {
        self.path = path
        self.onFrozen = onFrozen
        listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { p in
            for (i, b) in path.utf8.enumerated() { p[i] = b }
        }
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, listen(listener, 1) == 0 else { throw TestFailure("relay: cannot listen on \(path): errno \(errno)") }
        let thread = Thread { [self] in self.serve(agent) }
        thread.start()
    }

    private func serve(_ agent: String) {
        defer { close(listener) }
        let client = accept(listener, nil, nil)
        guard client >= 0, let upstream = try? connectUnixSocket(agent, alive: { true }) else { return }
        defer { close(client); close(upstream) }
        var fromClient: [UInt8] = [], fromAgent: [UInt8] = []
        var freezeSent = false, answered = false, next = Next.pass
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            var fds = [pollfd(fd: client, events: Int16(POLLIN), revents: 0), pollfd(fd: upstream, events: Int16(POLLIN), revents: 0)]
            guard poll(&fds, 2, -1) > 0 || errno == EINTR else { return }
            for (i, (from, to)) in [(client, upstream), (upstream, client)].enumerated() where fds[i].revents != 0 {
                let n = read(from, &buffer, buffer.count)
                guard n > 0 else { return }
                let bytes = Array(buffer[..<n])
                if from == client {
                    fromClient += bytes
                    freezeSent = freezeSent || String(decoding: fromClient, as: UTF8.self).contains("guest-fsfreeze-freeze")
                } else if freezeSent && !answered {
                    fromAgent += bytes
                    // The first whole line after the freeze command is its answer: the guest is frozen.
                    if fromAgent.contains(0x0A) {
                        answered = true
                        next = onFrozen()
                    }
                }
                if next == .hold { continue }
                _ = bytes.withUnsafeBytes { write(to, $0.baseAddress, $0.count) }
                if next == .passThenCut { return }
            }
        }
    }
}
