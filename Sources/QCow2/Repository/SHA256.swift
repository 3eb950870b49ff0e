import CCrypto

/// SHA-256 (OpenSSL's libcrypto): the digests a backup repository records for the data
/// runs and the metadata of its points.
public struct SHA256 {
    private var context: OpaquePointer?

    public init() {
        context = EVP_MD_CTX_new()
        if let c = context, EVP_DigestInit_ex(c, EVP_sha256(), nil) != 1 { EVP_MD_CTX_free(c); context = nil }
    }

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        guard let c = context, let base = bytes.baseAddress, bytes.count > 0 else { return }
        _ = EVP_DigestUpdate(c, base, bytes.count)
    }

    public mutating func update(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    /// The digest as 64 lowercase hex digits ("" if libcrypto could not set up a context:
    /// such a digest never matches one that was recorded).
    public mutating func finish() -> String {
        guard let c = context else { return "" }
        var out = [UInt8](repeating: 0, count: 32)
        var n: UInt32 = 0
        let ok = out.withUnsafeMutableBufferPointer { EVP_DigestFinal_ex(c, $0.baseAddress, &n) } == 1
        EVP_MD_CTX_free(c)
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

    public static func digest(_ bytes: [UInt8]) -> String {
        var h = SHA256()
        h.update(bytes)
        return h.finish()
    }
}
