/// A JSON value as parsed from a `json:{...}` file name (QEMU's pseudo-protocol).
/// Numbers are kept as their text: qimg only needs to name them, never compute with them.
indirect enum ParsedJSON: Equatable, Sendable {
    case object([(key: String, value: ParsedJSON)])
    case array([ParsedJSON])
    case string(String)
    case number(String)
    case bool(Bool)
    case null

    static func == (a: ParsedJSON, b: ParsedJSON) -> Bool {
        switch (a, b) {
        case (.object(let x), .object(let y)):
            return x.count == y.count && zip(x, y).allSatisfy { $0.key == $1.key && $0.value == $1.value }
        case (.array(let x), .array(let y)): return x == y
        case (.string(let x), .string(let y)), (.number(let x), .number(let y)): return x == y
        case (.bool(let x), .bool(let y)): return x == y
        case (.null, .null): return true
        default: return false
        }
    }
}

/// A small, bounded JSON parser (RFC 8259, plus QEMU's refusal of duplicate keys).
/// Every malformed input is a `FormatError`; nothing traps, recursion is capped.
struct JSONParser {
    static let maxDepth = 32
    static let maxBytes = 64 * 1024

    private let b: [UInt8]
    private var i = 0

    private init(_ bytes: [UInt8]) { b = bytes }

    static func parse(_ text: String) throws(FormatError) -> ParsedJSON {
        let bytes = Array(text.utf8)
        guard bytes.count <= maxBytes else { throw FormatError("json", "longer than \(maxBytes) bytes") }
        var p = JSONParser(bytes)
        let v = try p.value(depth: 0)
        p.skipSpace()
        guard p.i == p.b.count else { throw p.fail("unexpected text after the value") }
        return v
    }

    private func fail(_ what: String) -> FormatError { FormatError("json", "\(what) at byte \(i)") }

    private var peek: UInt8? { i < b.count ? b[i] : nil }

    private mutating func skipSpace() {
        while let c = peek, c == 0x20 || c == 0x09 || c == 0x0A || c == 0x0D { i += 1 }
    }

    private mutating func expect(_ c: UInt8) throws(FormatError) {
        skipSpace()
        guard peek == c else { throw fail("expected '\(Character(Unicode.Scalar(c)))'") }
        i += 1
    }

    private mutating func value(depth: Int) throws(FormatError) -> ParsedJSON {
        guard depth < Self.maxDepth else { throw fail("nested deeper than \(Self.maxDepth) levels") }
        skipSpace()
        guard let c = peek else { throw fail("unexpected end of text") }
        switch c {
        case UInt8(ascii: "{"): return try object(depth: depth)
        case UInt8(ascii: "["): return try array(depth: depth)
        case UInt8(ascii: "\""): return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return .number(try number())
        default: throw fail("unexpected character")
        }
    }

    private mutating func literal(_ word: String) throws(FormatError) {
        for w in word.utf8 {
            guard peek == w else { throw fail("invalid keyword") }
            i += 1
        }
    }

    private mutating func object(depth: Int) throws(FormatError) -> ParsedJSON {
        i += 1
        var members: [(key: String, value: ParsedJSON)] = []
        var keys = Set<String>()
        skipSpace()
        if peek == UInt8(ascii: "}") { i += 1; return .object(members) }
        while true {
            skipSpace()
            guard peek == UInt8(ascii: "\"") else { throw fail("expected a member name") }
            let k = try string()
            guard keys.insert(k).inserted else { throw fail("duplicate key '\(k)'") }
            try expect(UInt8(ascii: ":"))
            members.append((k, try value(depth: depth + 1)))
            skipSpace()
            guard let c = peek else { throw fail("unterminated object") }
            i += 1
            if c == UInt8(ascii: "}") { return .object(members) }
            guard c == UInt8(ascii: ",") else { throw fail("expected ',' or '}'") }
        }
    }

    private mutating func array(depth: Int) throws(FormatError) -> ParsedJSON {
        i += 1
        var items: [ParsedJSON] = []
        skipSpace()
        if peek == UInt8(ascii: "]") { i += 1; return .array(items) }
        while true {
            items.append(try value(depth: depth + 1))
            skipSpace()
            guard let c = peek else { throw fail("unterminated array") }
            i += 1
            if c == UInt8(ascii: "]") { return .array(items) }
            guard c == UInt8(ascii: ",") else { throw fail("expected ',' or ']'") }
        }
    }

    private mutating func number() throws(FormatError) -> String {
        let start = i
        if peek == UInt8(ascii: "-") { i += 1 }
        func digits(_ p: inout JSONParser) -> Int {
            var n = 0
            while let c = p.peek, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(c) { p.i += 1; n += 1 }
            return n
        }
        guard digits(&self) > 0 else { throw fail("invalid number") }
        if peek == UInt8(ascii: ".") {
            i += 1
            guard digits(&self) > 0 else { throw fail("invalid number") }
        }
        if peek == UInt8(ascii: "e") || peek == UInt8(ascii: "E") {
            i += 1
            if peek == UInt8(ascii: "+") || peek == UInt8(ascii: "-") { i += 1 }
            guard digits(&self) > 0 else { throw fail("invalid number") }
        }
        return String(decoding: b[start..<i], as: UTF8.self)
    }

    private mutating func string() throws(FormatError) -> String {
        i += 1
        var out: [UInt8] = []
        while true {
            guard let c = peek else { throw fail("unterminated string") }
            i += 1
            switch c {
            case UInt8(ascii: "\""):
                return String(decoding: out, as: UTF8.self)
            case UInt8(ascii: "\\"):
                try escape(into: &out)
            case 0..<0x20:
                throw fail("control character in a string")
            default:
                out.append(c)
            }
        }
    }

    private mutating func escape(into out: inout [UInt8]) throws(FormatError) {
        guard let e = peek else { throw fail("unterminated escape") }
        i += 1
        let simple: [UInt8: UInt8] = [0x22: 0x22, 0x5C: 0x5C, 0x2F: 0x2F, 0x62: 0x08, 0x66: 0x0C, 0x6E: 0x0A, 0x72: 0x0D, 0x74: 0x09]
        if let s = simple[e] { out.append(s); return }
        guard e == UInt8(ascii: "u") else { throw fail("invalid escape") }
        var scalar = try hex4()
        if (0xD800..<0xDC00).contains(scalar) {
            guard peek == UInt8(ascii: "\\") else { throw fail("unpaired surrogate") }
            i += 1
            guard peek == UInt8(ascii: "u") else { throw fail("unpaired surrogate") }
            i += 1
            let low = try hex4()
            guard (0xDC00..<0xE000).contains(low) else { throw fail("unpaired surrogate") }
            scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
        }
        guard scalar != 0, let u = Unicode.Scalar(scalar) else { throw fail("invalid \\u escape") }
        out.append(contentsOf: Array(String(Character(u)).utf8))
    }

    private mutating func hex4() throws(FormatError) -> UInt32 {
        var v: UInt32 = 0
        for _ in 0..<4 {
            guard let c = peek, let d = Self.hexDigit(c) else { throw fail("invalid \\u escape") }
            v = v << 4 | d
            i += 1
        }
        return v
    }

    private static func hexDigit(_ c: UInt8) -> UInt32? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return UInt32(c - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return UInt32(c - UInt8(ascii: "a") + 10)
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return UInt32(c - UInt8(ascii: "A") + 10)
        default: return nil
        }
    }
}
