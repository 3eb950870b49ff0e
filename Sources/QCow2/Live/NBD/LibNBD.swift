#if canImport(Glibc)
import Glibc
#endif
import CNBD

/// The libnbd functions an NBD source uses, looked up once per process.
///
/// libnbd is loaded on first use (`dlopen`), not linked: it brings gnutls, libxml2 and
/// their dependencies, which every qimg command would otherwise load at start (see
/// Docs/live-backup.md for the measurement). Debian's `libnbd0` provides it (a
/// dependency of `libnbd-dev` and `libnbd-bin`); the CNBD module gives the header's types.
struct LibNBD: @unchecked Sendable {
    typealias Handle = OpaquePointer
    typealias Create = @convention(c) () -> Handle?
    typealias Close = @convention(c) (Handle?) -> Void
    typealias GetError = @convention(c) () -> UnsafePointer<CChar>?
    typealias GetErrno = @convention(c) () -> Int32
    typealias WithString = @convention(c) (Handle?, UnsafePointer<CChar>?) -> Int32
    typealias GetSize = @convention(c) (Handle?) -> Int64
    typealias GetBlockSize = @convention(c) (Handle?, Int32) -> Int64
    typealias AioBlockStatus = @convention(c) (Handle?, UInt64, UInt64, nbd_extent_callback, nbd_completion_callback, UInt32) -> Int64
    typealias Shutdown = @convention(c) (Handle?, UInt32) -> Int32
    typealias AioPRead = @convention(c) (Handle?, UnsafeMutableRawPointer?, Int, UInt64, nbd_completion_callback, UInt32) -> Int64
    typealias Completed = @convention(c) (Handle?, UInt64) -> Int32
    typealias Poll = @convention(c) (Handle?, Int32) -> Int32
    typealias State = @convention(c) (Handle?) -> Int32
    typealias SetFlag = @convention(c) (Handle?, Bool) -> Int32

    let create: Create
    let close: Close
    let getError: GetError
    let getErrno: GetErrno
    let addMetaContext: WithString
    let canMetaContext: WithString
    let getSize: GetSize
    let getBlockSize: GetBlockSize
    let aioBlockStatus: AioBlockStatus
    let shutdown: Shutdown
    let aioPread: AioPRead
    let aioCommandCompleted: Completed
    let poll: Poll
    let aioConnectURI: WithString
    let aioIsConnecting: State
    let aioIsReady: State
    let setURIAllowLocalFile: SetFlag

    static let library = "libnbd.so.0"

    /// Loaded once; the error (libnbd missing) is kept and thrown at each use.
    static let shared: Result<LibNBD, QCow2Error> = Result { try load() }.mapError {
        $0 as? QCow2Error ?? .unsupported(path: library, detail: "\($0)")
    }

    /// libnbd's message for the last failed call of this thread.
    var lastError: String {
        guard let p = getError() else { return "unknown error (errno \(getErrno()))" }
        var s = String(cString: p)
        // "nbd_pread: read: ...": the function's name says nothing to a user.
        if s.hasPrefix("nbd_"), let colon = s.firstIndex(of: ":") {
            s = String(s[s.index(after: colon)...].drop(while: { $0 == " " }))
        }
        return s
    }

    private static func load() throws -> LibNBD {
        let lib = try DynamicLibrary([library, "libnbd.so"],
                                     missing: "libnbd is needed to read NBD exports and was not found (Debian: libnbd0)")
        func symbol<T>(_ name: String, as type: T.Type) throws -> T {
            try lib.function(name, as: type, hint: "libnbd 1.14 or later is needed")
        }
        return LibNBD(create: try symbol("nbd_create", as: Create.self),
                      close: try symbol("nbd_close", as: Close.self),
                      getError: try symbol("nbd_get_error", as: GetError.self),
                      getErrno: try symbol("nbd_get_errno", as: GetErrno.self),
                      addMetaContext: try symbol("nbd_add_meta_context", as: WithString.self),
                      canMetaContext: try symbol("nbd_can_meta_context", as: WithString.self),
                      getSize: try symbol("nbd_get_size", as: GetSize.self),
                      getBlockSize: try symbol("nbd_get_block_size", as: GetBlockSize.self),
                      aioBlockStatus: try symbol("nbd_aio_block_status", as: AioBlockStatus.self),
                      shutdown: try symbol("nbd_shutdown", as: Shutdown.self),
                      aioPread: try symbol("nbd_aio_pread", as: AioPRead.self),
                      aioCommandCompleted: try symbol("nbd_aio_command_completed", as: Completed.self),
                      poll: try symbol("nbd_poll", as: Poll.self),
                      aioConnectURI: try symbol("nbd_aio_connect_uri", as: WithString.self),
                      aioIsConnecting: try symbol("nbd_aio_is_connecting", as: State.self),
                      aioIsReady: try symbol("nbd_aio_is_ready", as: State.self),
                      setURIAllowLocalFile: try symbol("nbd_set_uri_allow_local_file", as: SetFlag.self))
    }
}
