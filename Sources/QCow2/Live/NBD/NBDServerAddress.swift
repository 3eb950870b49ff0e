/// Where a running QEMU serves NBD, read from a URI as `qimg backup --qmp ... --nbd URI`
/// takes it: `nbd+unix:///[EXPORT]?socket=PATH` or `nbd://HOST[:PORT]/[EXPORT]`. It gives
/// the address `nbd-server-start` takes, and the URI of one export on that server.
struct NBDServerAddress: Equatable {
    enum Kind: Equatable {
        case unix(path: String)
        case inet(host: String, port: String)
    }

    let kind: Kind
    /// The export named in the URI (empty: qimg names it).
    let export: String

    init(uri: String) throws(QCow2Error) {
        func invalid(_ m: String) -> QCow2Error { .invalidArgument(path: uri, detail: m) }
        guard let sep = uri.firstRange(of: "://") else { throw invalid("not an NBD URI (nbd+unix:///?socket=PATH or nbd://HOST:PORT)") }
        let scheme = uri[..<sep.lowerBound], rest = uri[sep.upperBound...]
        let (beforeQuery, query) = rest.firstIndex(of: "?").map { (rest[..<$0], rest[rest.index(after: $0)...]) } ?? (rest, "")
        let slash = beforeQuery.firstIndex(of: "/") ?? beforeQuery.endIndex
        let authority = String(beforeQuery[..<slash])
        export = slash < beforeQuery.endIndex ? String(beforeQuery[beforeQuery.index(after: slash)...]) : ""
        switch scheme {
        case "nbd+unix":
            guard authority.isEmpty else { throw invalid("a unix-socket URI has no host (nbd+unix:///?socket=PATH)") }
            let socket = query.split(separator: "&").first { $0.hasPrefix("socket=") }.map { String($0.dropFirst("socket=".count)) }
            guard let socket, socket.hasPrefix("/") else { throw invalid("the URI needs socket=PATH, an absolute path") }
            kind = .unix(path: socket)
        case "nbd":
            guard !authority.isEmpty, query.isEmpty else { throw invalid("a TCP URI is nbd://HOST[:PORT]/[EXPORT]") }
            var host = authority, port = "10809"
            if let close = authority.lastIndex(of: "]") {   // [IPv6]:port
                host = String(authority[authority.index(after: authority.startIndex)..<close])
                let after = authority[authority.index(after: close)...]
                if after.hasPrefix(":") { port = String(after.dropFirst()) }
            } else if let colon = authority.lastIndex(of: ":") {
                host = String(authority[..<colon])
                port = String(authority[authority.index(after: colon)...])
            }
            guard !host.isEmpty, !port.isEmpty, port.allSatisfy(\.isNumber) else { throw invalid("a TCP URI is nbd://HOST[:PORT]/[EXPORT]") }
            kind = .inet(host: host, port: port)
        default:
            throw invalid("QEMU serves NBD over nbd+unix:// or nbd:// (TLS is not set up by qimg)")
        }
    }

    /// The `addr` argument of `nbd-server-start` (the form with `data`, as QEMU 7.2 takes it).
    var qmpAddress: JSON {
        switch kind {
        case .unix(let path):
            return .object([("type", .string("unix")), ("data", .object([("path", .string(path))]))])
        case .inet(let host, let port):
            return .object([("type", .string("inet")), ("data", .object([("host", .string(host)), ("port", .string(port))]))])
        }
    }

    /// The URI of export `name` on this server, for libnbd.
    func uri(export name: String) -> String {
        switch kind {
        case .unix(let path): return "nbd+unix:///\(name)?socket=\(path)"
        case .inet(let host, let port): return "nbd://\(host.contains(":") ? "[\(host)]" : host):\(port)/\(name)"
        }
    }
}
