/// A small JSON model for the repository manifest: a bounded reader that never traps
/// (depth, size and number range checked; errors are `FormatError`s), and a writer with
/// the keys in the order given.
public indirect enum JSON: Equatable, Sendable {
    case object([(String, JSON)])
    case array([JSON])
    case string(String)
    case number(UInt64)
    case bool(Bool)
    case null

    public static func == (a: JSON, b: JSON) -> Bool {
        switch (a, b) {
        case (.object(let x), .object(let y)): return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        case (.array(let x), .array(let y)): return x == y
        case (.string(let x), .string(let y)): return x == y
        case (.number(let x), .number(let y)): return x == y
        case (.bool(let x), .bool(let y)): return x == y
        case (.null, .null): return true
        default: return false
        }
    }

    public subscript(key: String) -> JSON? {
        if case .object(let pairs) = self { return pairs.first { $0.0 == key }?.1 }
        return nil
    }

    // MARK: Writing

    /// Compact when `indent` is nil, else pretty with that many spaces a level.
    public func rendered(indent: Int? = 2) -> String {
        var out = ""
        write(into: &out, level: 0, indent: indent)
        return out
    }

    private func write(into out: inout String, level: Int, indent: Int?) {
        let nl = indent == nil ? "" : "\n"
        func pad(_ l: Int) -> String { String(repeating: " ", count: (indent ?? 0) * l) }
        switch self {
        case .object(let pairs):
            if pairs.isEmpty { out += "{}"; return }
            out += "{" + nl
            for (i, (k, v)) in pairs.enumerated() {
                out += pad(level + 1) + JSON.quote(k) + (indent == nil ? ":" : ": ")
                v.write(into: &out, level: level + 1, indent: indent)
                out += (i == pairs.count - 1 ? "" : ",") + nl
            }
            out += pad(level) + "}"
        case .array(let items):
            // Arrays of scalars stay on one line.
            let flat = indent == nil || items.allSatisfy { if case .object = $0 { return false }; if case .array = $0 { return false }; return true }
            if items.isEmpty { out += "[]"; return }
            out += "[" + (flat ? "" : nl)
            for (i, v) in items.enumerated() {
                if !flat { out += pad(level + 1) }
                v.write(into: &out, level: level + 1, indent: flat ? nil : indent)
                out += i == items.count - 1 ? "" : (flat ? (indent == nil ? "," : ", ") : "," + nl)
            }
            out += (flat ? "" : nl + pad(level)) + "]"
        case .string(let s): out += JSON.quote(s)
        case .number(let n): out += String(n)
        case .bool(let b): out += b ? "true" : "false"
        case .null: out += "null"
        }
    }

    /// A JSON string. `qemu`: as QEMU quotes (every non-ASCII character as \uXXXX, a byte
    /// of invalid UTF-8 as U+FFFD); otherwise UTF-8 stays as it is and a byte of invalid
    /// UTF-8 keeps its `PathCodec` scalar (read back to the same byte).
    public static func quote(_ s: String, qemu: Bool = false) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if qemu && PathCodec.isEscape(u) {
                    out += "\\uFFFD"
                } else if u.value < 0x20 || (qemu && u.value >= 0x7F) || PathCodec.isEscape(u) {
                    if u.value > 0xFFFF {
                        let v = u.value - 0x10000
                        out += hex4(0xD800 | (v >> 10)) + hex4(0xDC00 | (v & 0x3FF))
                    } else {
                        out += hex4(u.value)
                    }
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        return out + "\""
    }

    static func hex4(_ v: UInt32) -> String {
        let h = String(v, radix: 16, uppercase: true)
        return "\\u" + String(repeating: "0", count: max(0, 4 - h.count)) + h
    }

    // MARK: Reading

    /// Parses `bytes` (one value, surrounding white space allowed). Numbers are
    /// non-negative integers that fit 64 bits (all the manifest holds).
    public static func parse(_ bytes: [UInt8], maxDepth: Int = 32) throws -> JSON {
        var r = JSONReader(bytes: bytes, maxDepth: maxDepth)
        let v = try r.value(depth: 0)
        r.skipSpace()
        guard r.pos == bytes.count else { throw r.error("unexpected data after the value") }
        return v
    }
}

private struct JSONReader {
    let bytes: [UInt8]
    let maxDepth: Int
    var pos = 0

    init(bytes: [UInt8], maxDepth: Int) {
        self.bytes = bytes
        self.maxDepth = maxDepth
    }

    func error(_ what: String) -> FormatError { FormatError("JSON", "\(what) at byte \(pos)") }

    mutating func skipSpace() {
        while pos < bytes.count, [0x20, 0x0A, 0x0D, 0x09].contains(bytes[pos]) { pos += 1 }
    }

    mutating func expect(_ literal: String) throws {
        for c in literal.utf8 {
            guard pos < bytes.count, bytes[pos] == c else { throw error("expected '\(literal)'") }
            pos += 1
        }
    }

    mutating func value(depth: Int) throws -> JSON {
        guard depth <= maxDepth else { throw error("nesting too deep") }
        skipSpace()
        guard pos < bytes.count else { throw error("unexpected end") }
        switch bytes[pos] {
        case UInt8(ascii: "{"):
            pos += 1
            var pairs: [(String, JSON)] = []
            skipSpace()
            if pos < bytes.count, bytes[pos] == UInt8(ascii: "}") { pos += 1; return .object(pairs) }
            while true {
                skipSpace()
                let k = try string()
                skipSpace()
                try expect(":")
                pairs.append((k, try value(depth: depth + 1)))
                skipSpace()
                guard pos < bytes.count else { throw error("unexpected end") }
                pos += 1
                if bytes[pos - 1] == UInt8(ascii: "}") { return .object(pairs) }
                guard bytes[pos - 1] == UInt8(ascii: ",") else { throw error("expected ',' or '}'") }
            }
        case UInt8(ascii: "["):
            pos += 1
            var items: [JSON] = []
            skipSpace()
            if pos < bytes.count, bytes[pos] == UInt8(ascii: "]") { pos += 1; return .array(items) }
            while true {
                items.append(try value(depth: depth + 1))
                skipSpace()
                guard pos < bytes.count else { throw error("unexpected end") }
                pos += 1
                if bytes[pos - 1] == UInt8(ascii: "]") { return .array(items) }
                guard bytes[pos - 1] == UInt8(ascii: ",") else { throw error("expected ',' or ']'") }
            }
        case UInt8(ascii: "\""): return .string(try string())
        case UInt8(ascii: "t"): try expect("true"); return .bool(true)
        case UInt8(ascii: "f"): try expect("false"); return .bool(false)
        case UInt8(ascii: "n"): try expect("null"); return .null
        default: return .number(try number())
        }
    }

    mutating func number() throws -> UInt64 {
        var n: UInt64 = 0
        let start = pos
        while pos < bytes.count, bytes[pos] >= 0x30, bytes[pos] <= 0x39 {
            let (m, o1) = n.multipliedReportingOverflow(by: 10)
            let (s, o2) = m.addingReportingOverflow(UInt64(bytes[pos] - 0x30))
            guard !o1, !o2 else { throw error("number out of range") }
            n = s
            pos += 1
        }
        guard pos > start else { throw error("unexpected character") }
        return n
    }

    mutating func string() throws -> String {
        guard pos < bytes.count, bytes[pos] == UInt8(ascii: "\"") else { throw error("expected a string") }
        pos += 1
        var raw: [UInt8] = []
        var scalars = String.UnicodeScalarView()
        func flush() { if !raw.isEmpty { scalars.append(contentsOf: PathCodec.decode(raw).unicodeScalars); raw.removeAll() } }
        while pos < bytes.count {
            let c = bytes[pos]
            pos += 1
            if c == UInt8(ascii: "\"") { flush(); return String(scalars) }
            guard c >= 0x20 else { throw error("control character in a string") }
            guard c == UInt8(ascii: "\\") else { raw.append(c); continue }
            guard pos < bytes.count else { break }
            let e = bytes[pos]
            pos += 1
            switch e {
            case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): raw.append(e)
            case UInt8(ascii: "n"): raw.append(0x0A)
            case UInt8(ascii: "r"): raw.append(0x0D)
            case UInt8(ascii: "t"): raw.append(0x09)
            case UInt8(ascii: "b"): raw.append(0x08)
            case UInt8(ascii: "f"): raw.append(0x0C)
            case UInt8(ascii: "u"):
                flush()
                var v = try hex4()
                if (0xD800...0xDBFF).contains(v) {
                    // A surrogate pair: \uD8xx\uDCxx.
                    guard pos + 1 < bytes.count, bytes[pos] == UInt8(ascii: "\\"), bytes[pos + 1] == UInt8(ascii: "u") else { throw error("bad \\u escape") }
                    pos += 2
                    let low = try hex4()
                    guard (0xDC00...0xDFFF).contains(low) else { throw error("bad \\u escape") }
                    v = 0x10000 + ((v - 0xD800) << 10) + (low - 0xDC00)
                }
                guard let u = Unicode.Scalar(v) else { throw error("bad \\u escape") }
                scalars.append(u)
            default: throw error("bad escape")
            }
        }
        throw error("unterminated string")
    }

    mutating func hex4() throws -> UInt32 {
        var v: UInt32 = 0
        for _ in 0..<4 {
            guard pos < bytes.count, let d = hexValue(bytes[pos]) else { throw error("bad \\u escape") }
            v = v << 4 | d
            pos += 1
        }
        return v
    }

    func hexValue(_ c: UInt8) -> UInt32? {
        switch c {
        case 0x30...0x39: return UInt32(c - 0x30)
        case 0x41...0x46: return UInt32(c - 0x41 + 10)
        case 0x61...0x66: return UInt32(c - 0x61 + 10)
        default: return nil
        }
    }
}
