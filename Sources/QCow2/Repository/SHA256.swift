#if canImport(Glibc)
import Glibc
#endif

/// SHA-256 (OpenSSL's libcrypto): the digests a backup repository records for the data
/// runs and the metadata of its points.
///
/// libcrypto is loaded on first use (`dlopen`), not linked: linking it made every qimg
/// command ~2 ms slower to start (measured: `qimg info` 6.0 → 8.1 ms), and only the
/// repository commands need it. Debian's `libssl3` provides it (a dependency of `openssl`).
public struct SHA256 {
    private var context: OpaquePointer?
    private let api: LibCrypto

    /// Throws when libcrypto cannot be loaded or set up a SHA-256 context.
    public init() throws {
        api = try LibCrypto.shared.get()
        context = api.newContext()
        guard let c = context, api.initDigest(c, api.sha256(), nil) == 1 else {
            if let c = context { api.freeContext(c) }
            throw QCow2Error.unsupported(path: "libcrypto", detail: "cannot set up a SHA-256 context")
        }
    }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard let c = context, let base = bytes.baseAddress, bytes.count > 0 else { return }
        _ = api.update(c, base, bytes.count)
    }

    public mutating func update(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    /// The digest as 64 lowercase hex digits ("" if libcrypto failed: such a digest never
    /// matches one that was recorded).
    public mutating func finish() -> String {
        guard let c = context else { return "" }
        var out = [UInt8](repeating: 0, count: 32)
        var n: UInt32 = 0
        let ok = out.withUnsafeMutableBufferPointer { api.final(c, $0.baseAddress, &n) } == 1
        api.freeContext(c)
        context = nil
        guard ok, n == 32 else { return "" }
        return Self.hex(out)
    }

    public static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var s: [UInt8] = []
        s.reserveCapacity(bytes.count * 2)
        for b in bytes { s.append(digits[Int(b >> 4)]); s.append(digits[Int(b & 15)]) }
        return String(decoding: s, as: UTF8.self)
    }

    public static func digest(_ bytes: [UInt8]) throws -> String {
        var h = try SHA256()
        h.update(bytes)
        return h.finish()
    }
}

/// The five EVP functions SHA256 uses, looked up in libcrypto once per process.
struct LibCrypto: @unchecked Sendable {
    typealias NewContext = @convention(c) () -> OpaquePointer?
    typealias Digest = @convention(c) () -> OpaquePointer?
    typealias InitDigest = @convention(c) (OpaquePointer?, OpaquePointer?, OpaquePointer?) -> Int32
    typealias Update = @convention(c) (OpaquePointer?, UnsafeRawPointer?, Int) -> Int32
    typealias Final = @convention(c) (OpaquePointer?, UnsafeMutablePointer<UInt8>?, UnsafeMutablePointer<UInt32>?) -> Int32
    typealias FreeContext = @convention(c) (OpaquePointer?) -> Void

    let newContext: NewContext
    let sha256: Digest
    let initDigest: InitDigest
    let update: Update
    let final: Final
    let freeContext: FreeContext

    /// Loaded once; the error (libcrypto missing) is kept and thrown at each use.
    static let shared: Result<LibCrypto, QCow2Error> = Result { try load() }.mapError {
        $0 as? QCow2Error ?? .unsupported(path: "libcrypto", detail: "\($0)")
    }

    private static func load() throws -> LibCrypto {
        let lib = try DynamicLibrary(["libcrypto.so.3", "libcrypto.so"],
                                     missing: "OpenSSL's libcrypto is needed for SHA-256 digests and was not found (Debian: libssl3)")
        func symbol<T>(_ name: String, as type: T.Type) throws -> T { try lib.function(name, as: type) }
        return LibCrypto(newContext: try symbol("EVP_MD_CTX_new", as: NewContext.self),
                         sha256: try symbol("EVP_sha256", as: Digest.self),
                         initDigest: try symbol("EVP_DigestInit_ex", as: InitDigest.self),
                         update: try symbol("EVP_DigestUpdate", as: Update.self),
                         final: try symbol("EVP_DigestFinal_ex", as: Final.self),
                         freeContext: try symbol("EVP_MD_CTX_free", as: FreeContext.self))
    }
}
