import CNBD

/// One connection to an NBD export through libnbd: its size, reads (NBD_CMD_READ) and
/// block status (NBD_CMD_BLOCK_STATUS) for the meta contexts asked for at connection.
/// Every failure is a `QCow2Error.remote` naming the URI. Everything the server sends
/// is checked: a size or an extent list that makes no sense is an error, never a trap.
/// Every request is asynchronous (libnbd's aio calls and `nbd_poll`): a server that stops
/// answering fails the request after `timeout` seconds without a byte from it, and a stop
/// request (SIGINT/SIGTERM) ends any wait within 200 ms.
public final class NBDClient {
    public let uri: String
    public let size: UInt64
    private let api: LibNBD
    private let handle: LibNBD.Handle
    /// Every wait for the server (bounded: a silent server fails the request).
    private let waiter: NBDWait
    /// A wait failed: the connection is dropped without the polite disconnect, which would
    /// wait for a server that may never answer, and no later request is sent.
    private var broken = false
    /// The largest read the server accepts (QEMU: 32 MiB).
    let maxRead: Int
    /// Buffers of overlapped reads (`makeReadBuffer`), freed once the connection is closed.
    private var readBuffers: [UnsafeMutableRawPointer] = []

    /// The NBD flag bits of one extent, and its length.
    public struct Extent: Equatable, Sendable {
        public var length: UInt64
        public var flags: UInt32
    }

    /// How long the handshake, or any request, may go without a byte from the server: a
    /// server that accepts the connection but never answers (qemu-nbd without --shared
    /// serving another client), or that stops answering mid-copy, must not hang a cron job.
    public static let defaultTimeout: Double = 60

    /// Connects to `uri` (as libnbd's nbd_connect_uri takes it), asking for `contexts`. The
    /// handshake and every later request give up after `timeout` seconds without progress,
    /// or as soon as `shouldStop` says so.
    public init(uri: String, contexts: [String], timeout: Double = NBDClient.defaultTimeout,
                shouldStop: @escaping () -> Bool = { false }) throws {
        let api = try LibNBD.shared.get()
        guard let h = api.create() else { throw QCow2Error.remote(path: uri, detail: "cannot create an NBD handle") }
        func fail() -> QCow2Error {
            let e = QCow2Error.remote(path: uri, detail: api.lastError)
            api.close(h)
            return e
        }
        for c in contexts where api.addMetaContext(h, c) == -1 { throw fail() }
        // The URI is the command line's, given by the user who runs qimg: it may name the
        // TLS certificates directory or PSK file (libnbd refuses local files by default).
        guard api.setURIAllowLocalFile(h, true) != -1 else { throw fail() }
        guard api.aioConnectURI(h, uri) != -1 else { throw fail() }
        let waiter = NBDWait(api: api, handle: h, uri: uri, timeout: timeout, shouldStop: shouldStop)
        do {
            try waiter.until("connecting to the server", hint: "busy? qemu-nbd serves one client at a time unless started with --shared") {
                if api.aioIsReady(h) == 1 { return 1 }
                return api.aioIsConnecting(h) == 1 ? 0 : -1
            }
        } catch {
            api.close(h)
            throw error
        }
        let s = api.getSize(h)
        guard s >= 0 else { throw fail() }
        self.uri = uri
        self.api = api
        handle = h
        self.waiter = waiter
        size = UInt64(s)
        let m = api.getBlockSize(h, Int32(LIBNBD_SIZE_MAXIMUM))
        // 0: the server gave no maximum; the protocol's safe default is 32 MiB.
        maxRead = m > 0 ? Int(min(m, 32 << 20)) : 32 << 20
    }

    deinit {
        if !broken { _ = api.shutdown(handle, 0) }
        api.close(handle)
        for b in readBuffers { b.deallocate() }
    }

    /// Waits (`NBDWait.until`) for request `what` to reach `state` 1.
    private func until(_ what: String, _ state: () -> Int32) throws {
        guard !broken else { throw QCow2Error.remote(path: uri, detail: "\(what): the connection was given up after an earlier failure") }
        do { try waiter.until(what, state) } catch {
            broken = true
            throw error
        }
    }

    /// A buffer for `startRead`, valid as long as the client.
    func makeReadBuffer(byteCount: Int) -> UnsafeMutableRawPointer {
        let b = UnsafeMutableRawPointer.allocate(byteCount: max(1, byteCount), alignment: 4096)
        readBuffers.append(b)
        return b
    }

    /// Whether the server agreed to `context` at connection.
    public func offers(_ context: String) -> Bool { api.canMetaContext(handle, context) == 1 }

    /// Fills `buffer` with the export's bytes at `offset`, in requests the server accepts.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard let base = buffer.baseAddress else { return }
        var done = 0
        while done < buffer.count {
            let n = min(maxRead, buffer.count - done)
            let at = offset + UInt64(done)
            let cookie = try startRead(into: base + done, count: n, at: at)
            try wait(for: cookie, count: n, at: at)
            done += n
        }
    }

    /// Sends a read of `count` (at most `maxRead`) bytes at `offset` into `buffer` without
    /// waiting for it; `buffer` must stay valid until `wait(for:)` returns or the client
    /// is gone. Returns the request's cookie.
    func startRead(into buffer: UnsafeMutableRawPointer, count: Int, at offset: UInt64) throws -> Int64 {
        let cookie = api.aioPread(handle, buffer, count, offset, nbd_completion_callback(), 0)
        guard cookie != -1 else {
            throw waiter.failed("read of \(count) bytes at offset \(offset)")
        }
        return cookie
    }

    /// Waits until request `cookie` (from `startRead`) is done, moving every request in
    /// flight along; a failed read, a connection lost or a silent server is an error naming `offset`.
    func wait(for cookie: Int64, count: Int, at offset: UInt64) throws {
        try until("read of \(count) bytes at offset \(offset)") { api.aioCommandCompleted(handle, UInt64(cookie)) }
    }

    /// The extents the server reports for each negotiated context from `offset` (one
    /// request of at most `length` bytes, clipped to 4 GiB - 1 by the protocol). Each
    /// context's list starts at `offset`, is non-empty, ends at or before `offset+length`
    /// and has no empty extent; a reply that breaks this is an error.
    public func blockStatus(at offset: UInt64, length: UInt64) throws -> [String: [Extent]] {
        guard offset < size else { return [:] }
        let count = min(length, size - offset, UInt64(UInt32.max))
        let collector = ExtentCollector(limit: count)
        var cb = nbd_extent_callback()
        cb.callback = { user, context, _, entries, n, _ in
            guard let user, let context else { return 0 }
            let c = Unmanaged<ExtentCollector>.fromOpaque(user).takeUnretainedValue()
            c.add(String(cString: context), entries, n)
            return 0
        }
        // libnbd owns a reference until the request is retired (or the handle closed), even
        // when the call fails: it calls `free` exactly once.
        cb.user_data = Unmanaged.passRetained(collector).toOpaque()
        cb.free = { user in if let user { Unmanaged<ExtentCollector>.fromOpaque(user).release() } }
        let what = "block status at offset \(offset)"
        let cookie = api.aioBlockStatus(handle, count, offset, cb, nbd_completion_callback(), 0)
        guard cookie != -1 else { throw waiter.failed(what) }
        try until(what) { api.aioCommandCompleted(handle, UInt64(cookie)) }
        if let bad = collector.invalid {
            throw QCow2Error.remote(path: uri, detail: "the server's block status at offset \(offset) is invalid: \(bad)")
        }
        return collector.extents
    }
}

/// Gathers the (length, flags) pairs of block-status callbacks, per context, checking
/// them: non-empty extents, clipped to the request.
private final class ExtentCollector {
    let limit: UInt64
    var extents: [String: [NBDClient.Extent]] = [:]
    var invalid: String?

    init(limit: UInt64) { self.limit = limit }

    func add(_ context: String, _ entries: UnsafeMutablePointer<UInt32>?, _ n: Int) {
        guard let entries, n >= 2 else { invalid = invalid ?? "no extent for \(context)"; return }
        var list = extents[context] ?? []
        var covered = list.reduce(0) { $0 + $1.length }
        for i in stride(from: 0, to: n - 1, by: 2) where covered < limit {
            let length = UInt64(entries[i])
            guard length > 0 else { invalid = invalid ?? "an empty extent for \(context)"; return }
            let clipped = min(length, limit - covered)
            list.append(NBDClient.Extent(length: clipped, flags: entries[i + 1]))
            covered += clipped
        }
        extents[context] = list
    }
}
