#if canImport(Glibc)
import Glibc
#endif

/// How an NBD connection waits for the server: libnbd's `nbd_poll` in steps of 200 ms
/// until the awaited state is reached. A wait fails when the connection made no progress
/// at all (nothing sent or received) for `timeout` seconds — a server that stopped
/// answering, never a slow one — or when `shouldStop` asks (SIGINT/SIGTERM).
struct NBDWait {
    let api: LibNBD
    let handle: LibNBD.Handle
    let uri: String
    let timeout: Double
    let shouldStop: () -> Bool

    /// Polls until `state` answers 1 (0: not yet; -1: failed, libnbd has the reason).
    /// `what` names the request in errors; `hint` is added when the server stays silent.
    func until(_ what: @autoclosure () -> String, hint: String? = nil, _ state: () -> Int32) throws {
        var lastProgress = monotonicNanoseconds()
        while true {
            switch state() {
            case 1: return
            case 0: break
            default: throw failed(what())
            }
            if shouldStop() { throw QCow2Error.remote(path: uri, detail: "interrupted while waiting for the server (\(what()))") }
            switch api.poll(handle, 200) {
            case 1:
                lastProgress = monotonicNanoseconds()
                continue
            case 0:
                break
            default:
                if api.getErrno() == EINTR { continue }
                throw failed(what())
            }
            if Double(monotonicNanoseconds() - lastProgress) / 1e9 >= timeout {
                let why = hint.map { " (\($0))" } ?? ""
                throw QCow2Error.remote(path: uri, detail: "\(what()): no reply from the server for \(Self.seconds(timeout))\(why)")
            }
        }
    }

    /// The request failed: libnbd's reason.
    func failed(_ what: String) -> QCow2Error {
        .remote(path: uri, detail: "\(what) failed: " + api.lastError)
    }

    static func seconds(_ t: Double) -> String {
        t == t.rounded() && t < 1e9 ? "\(Int(t)) s" : "\(t) s"
    }
}
