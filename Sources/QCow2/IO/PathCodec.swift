#if canImport(Glibc)
import Glibc
#endif

/// File names are bytes on Linux, Swift strings are Unicode: this codec carries any byte
/// string through a `String` unchanged. Valid UTF-8 decodes to its characters; each byte
/// of an invalid sequence becomes one private-use scalar U+10FD00 + byte (and the bytes
/// of a valid scalar that happens to lie in that range are escaped the same way, so the
/// mapping is one-to-one). Every system call on a path encodes it back to the exact
/// bytes; the CLI decodes its arguments and encodes what it prints the same way.
public enum PathCodec {
    static let escapeBase: UInt32 = 0x10FD00
    static let escapeRange: ClosedRange<UInt32> = 0x10FD00...0x10FDFF

    /// The string for the bytes `raw` (a file name, an argument, a backing file name).
    public static func decode<C: Collection>(_ raw: C) -> String where C.Element == UInt8 {
        let bytes = Array(raw)
        // The common case: valid UTF-8 with nothing in the escape range.
        if let s = String(validating: bytes, as: UTF8.self),
           !s.unicodeScalars.contains(where: { escapeRange.contains($0.value) }) {
            return s
        }
        var scalars = String.UnicodeScalarView()
        var i = 0
        while i < bytes.count {
            let (scalar, length) = decodeOne(bytes, at: i)
            if let scalar, !escapeRange.contains(scalar.value) {
                scalars.append(scalar)
            } else {
                for b in bytes[i..<(i + length)] { scalars.append(Unicode.Scalar(escapeBase + UInt32(b))!) }
            }
            i += length
        }
        return String(scalars)
    }

    /// One UTF-8 sequence at `i`: the scalar and its length, or nil and 1 for an invalid byte.
    static func decodeOne(_ b: [UInt8], at i: Int) -> (Unicode.Scalar?, Int) {
        let c = b[i]
        let need: Int
        switch c {
        case 0x00...0x7F: return (Unicode.Scalar(c), 1)
        case 0xC2...0xDF: need = 2
        case 0xE0...0xEF: need = 3
        case 0xF0...0xF4: need = 4
        default: return (nil, 1)
        }
        guard i + need <= b.count,
              let s = String(validating: b[i..<(i + need)], as: UTF8.self)?.unicodeScalars.first else { return (nil, 1) }
        return (s, need)
    }

    /// The bytes a decoded string stands for (no terminating zero).
    public static func encode(_ s: String) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(s.utf8.count)
        for u in s.unicodeScalars {
            if escapeRange.contains(u.value) {
                out.append(UInt8(u.value - escapeBase))
            } else {
                out.append(contentsOf: String(u).utf8)
            }
        }
        return out
    }

    /// Whether `u` stands for one byte of an invalid sequence.
    public static func isEscape(_ u: Unicode.Scalar) -> Bool { escapeRange.contains(u.value) }

    /// Whether `s` holds escaped bytes (not valid UTF-8 on disk).
    public static func hasEscapes(_ s: String) -> Bool {
        s.unicodeScalars.contains { escapeRange.contains($0.value) }
    }

    /// Calls `body` with the NUL-terminated bytes of `path`.
    public static func withCPath<R>(_ path: String, _ body: (UnsafePointer<CChar>) throws -> R) rethrows -> R {
        if !hasEscapes(path) { return try path.withCString(body) }
        var bytes = encode(path).map { CChar(bitPattern: $0) }
        bytes.append(0)
        return try bytes.withUnsafeBufferPointer { try body($0.baseAddress!) }
    }

    /// The string for a NUL-terminated C string (a directory entry, realpath's result).
    public static func decode(cString p: UnsafePointer<CChar>) -> String {
        decode(UnsafeBufferPointer(start: p, count: strlen(p)).map { UInt8(bitPattern: $0) })
    }
}

// Outside `Sys`, where `stat` names both the C function and the struct.
private func cStat(_ p: UnsafePointer<CChar>, _ st: inout stat) -> Int32 { stat(p, &st) }
private func cLstat(_ p: UnsafePointer<CChar>, _ st: inout stat) -> Int32 { lstat(p, &st) }

/// System calls on paths, through `PathCodec` (the exact bytes of the name).
enum Sys {
    static func open(_ path: String, _ flags: Int32, _ mode: mode_t = 0) -> Int32 {
        PathCodec.withCPath(path) { Glibc.open($0, flags, mode) }
    }
    static func stat(_ path: String, _ st: inout Glibc.stat) -> Int32 {
        PathCodec.withCPath(path) { cStat($0, &st) }
    }
    static func lstat(_ path: String, _ st: inout Glibc.stat) -> Int32 {
        PathCodec.withCPath(path) { cLstat($0, &st) }
    }
    static func unlink(_ path: String) -> Int32 {
        PathCodec.withCPath(path) { Glibc.unlink($0) }
    }
    static func rename(_ from: String, _ to: String) -> Int32 {
        PathCodec.withCPath(from) { f in PathCodec.withCPath(to) { Glibc.rename(f, $0) } }
    }
    static func link(_ from: String, _ to: String) -> Int32 {
        PathCodec.withCPath(from) { f in PathCodec.withCPath(to) { Glibc.link(f, $0) } }
    }
    static func mkdir(_ path: String, _ mode: mode_t) -> Int32 {
        PathCodec.withCPath(path) { Glibc.mkdir($0, mode) }
    }
    static func rmdir(_ path: String) -> Int32 {
        PathCodec.withCPath(path) { Glibc.rmdir($0) }
    }
    static func opendir(_ path: String) -> OpaquePointer? {
        PathCodec.withCPath(path) { Glibc.opendir($0) }
    }
    /// realpath(3), or nil.
    static func realpath(_ path: String) -> String? {
        PathCodec.withCPath(path) { p -> String? in
            guard let r = Glibc.realpath(p, nil) else { return nil }
            defer { free(r) }
            return PathCodec.decode(cString: r)
        }
    }
    /// The name of a directory entry.
    static func name(of e: UnsafeMutablePointer<dirent>) -> String {
        withUnsafeBytes(of: e.pointee.d_name) { raw in
            PathCodec.decode(cString: raw.bindMemory(to: CChar.self).baseAddress!)
        }
    }
}
