/// A JSON value, the library's one model of JSON: `json:{...}` backing names and block
/// options (read by QEMU's rules), the backup repository's manifest (read and written),
/// and the repository listings the CLI prints. Objects keep their members in order;
/// numbers keep their text (a `json:` name only names them; the manifest reads them as
/// `uint64`, exactly).
public indirect enum JSON: Equatable, Sendable {
    case object([(String, JSON)])
    case array([JSON])
    case string(String)
    case number(String)
    case bool(Bool)
    case null

    /// An unsigned integer, as its decimal text.
    public static func uint(_ n: UInt64) -> JSON { .number(String(n)) }

    /// The value of a number that is a plain decimal integer (digits only) fitting 64 bits.
    public var uint64: UInt64? {
        guard case .number(let text) = self, !text.isEmpty else { return nil }
        var n: UInt64 = 0
        for c in text.utf8 {
            guard c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9") else { return nil }
            let (m, o1) = n.multipliedReportingOverflow(by: 10)
            let (s, o2) = m.addingReportingOverflow(UInt64(c - UInt8(ascii: "0")))
            guard !o1, !o2 else { return nil }
            n = s
        }
        return n
    }

    /// The first member named `key` of an object.
    public subscript(key: String) -> JSON? {
        if case .object(let pairs) = self { return pairs.first { $0.0 == key }?.1 }
        return nil
    }

    public static func == (a: JSON, b: JSON) -> Bool {
        switch (a, b) {
        case (.object(let x), .object(let y)): return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        case (.array(let x), .array(let y)): return x == y
        case (.string(let x), .string(let y)), (.number(let x), .number(let y)): return x == y
        case (.bool(let x), .bool(let y)): return x == y
        case (.null, .null): return true
        default: return false
        }
    }
}

/// What a JSON reader accepts beyond RFC 8259's grammar: the bounds (nothing traps or
/// recurses without limit) and the refusals of the text's consumer.
public struct JSONRules: Sendable {
    /// Levels of nesting allowed (a root scalar is one level).
    public var maxDepth: Int
    /// The longest text read (nil: the caller bounds it).
    public var maxBytes: Int?
    /// A key given twice in one object is an error (QEMU), else both are kept.
    public var refusesDuplicateKeys: Bool
    /// `\u0000` in a string is an error (QEMU), else it is the character U+0000.
    public var refusesNUL: Bool
    /// Numbers are decimal integers of 64 bits at most, no sign, fraction or exponent.
    public var unsignedIntegersOnly: Bool

    /// QEMU's rules for `json:` file names and block options: 32 levels, 64 KiB,
    /// duplicate keys and `\u0000` refused, any JSON number (kept as its text).
    public static let qemu = JSONRules(maxDepth: 32, maxBytes: 64 * 1024, refusesDuplicateKeys: true,
                                       refusesNUL: true, unsignedIntegersOnly: false)
    /// The repository manifest's: the root and 32 nested levels, no size bound here
    /// (the repository bounds the file), UInt64 numbers only.
    public static let manifest = JSONRules(maxDepth: 33, maxBytes: nil, refusesDuplicateKeys: false,
                                           refusesNUL: false, unsignedIntegersOnly: true)
}

extension JSON {
    /// Parses `bytes` (one value, surrounding white space allowed). String bytes that are
    /// not UTF-8 keep their `PathCodec` scalars. Every malformed input is a `FormatError`.
    public static func parse(_ bytes: [UInt8], rules: JSONRules) throws(FormatError) -> JSON {
        if let cap = rules.maxBytes, bytes.count > cap { throw FormatError("JSON", "longer than \(cap) bytes") }
        var r = JSONReader(bytes, rules)
        let v = try r.value(depth: 0)
        r.skipSpace()
        guard r.i == bytes.count else { throw r.fail("unexpected text after the value") }
        return v
    }

    /// Parses `text`, a decoded name (its `PathCodec` scalars read back as their bytes).
    public static func parse(_ text: String, rules: JSONRules) throws(FormatError) -> JSON {
        if let cap = rules.maxBytes, text.utf8.count > cap { throw FormatError("JSON", "longer than \(cap) bytes") }
        return try parse(PathCodec.encode(text), rules: rules)
    }
}

/// The recursive-descent reader behind `JSON.parse`.
private struct JSONReader {
    let b: [UInt8]
    let rules: JSONRules
    var i = 0

    init(_ bytes: [UInt8], _ rules: JSONRules) {
        b = bytes
        self.rules = rules
    }

    func fail(_ what: String) -> FormatError { FormatError("JSON", "\(what) at byte \(i)") }

    var peek: UInt8? { i < b.count ? b[i] : nil }

    mutating func skipSpace() {
        while let c = peek, c == 0x20 || c == 0x09 || c == 0x0A || c == 0x0D { i += 1 }
    }

    mutating func expect(_ c: UInt8) throws(FormatError) {
        skipSpace()
        guard peek == c else { throw fail("expected '\(Character(Unicode.Scalar(c)))'") }
        i += 1
    }

    mutating func value(depth: Int) throws(FormatError) -> JSON {
        guard depth < rules.maxDepth else { throw fail("nested deeper than \(rules.maxDepth) levels") }
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

    mutating func literal(_ word: String) throws(FormatError) {
        for w in word.utf8 {
            guard peek == w else { throw fail("invalid keyword") }
            i += 1
        }
    }

    mutating func object(depth: Int) throws(FormatError) -> JSON {
        i += 1
        var members: [(String, JSON)] = []
        var keys = Set<String>()
        skipSpace()
        if peek == UInt8(ascii: "}") { i += 1; return .object(members) }
        while true {
            skipSpace()
            guard peek == UInt8(ascii: "\"") else { throw fail("expected a member name") }
            let k = try string()
            if rules.refusesDuplicateKeys, !keys.insert(k).inserted { throw fail("duplicate key '\(k)'") }
            try expect(UInt8(ascii: ":"))
            members.append((k, try value(depth: depth + 1)))
            skipSpace()
            guard let c = peek else { throw fail("unterminated object") }
            i += 1
            if c == UInt8(ascii: "}") { return .object(members) }
            guard c == UInt8(ascii: ",") else { throw fail("expected ',' or '}'") }
        }
    }

    mutating func array(depth: Int) throws(FormatError) -> JSON {
        i += 1
        var items: [JSON] = []
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

    /// A number's text: RFC 8259's grammar (leading zeros let through), or under
    /// `unsignedIntegersOnly` digits alone whose value fits 64 bits.
    mutating func number() throws(FormatError) -> String {
        let start = i
        if rules.unsignedIntegersOnly {
            guard digits() > 0 else { throw fail("unexpected character") }
            let text = String(decoding: b[start..<i], as: UTF8.self)
            guard JSON.number(text).uint64 != nil else { throw fail("number out of range") }
            return text
        }
        if peek == UInt8(ascii: "-") { i += 1 }
        guard digits() > 0 else { throw fail("invalid number") }
        if peek == UInt8(ascii: ".") {
            i += 1
            guard digits() > 0 else { throw fail("invalid number") }
        }
        if peek == UInt8(ascii: "e") || peek == UInt8(ascii: "E") {
            i += 1
            if peek == UInt8(ascii: "+") || peek == UInt8(ascii: "-") { i += 1 }
            guard digits() > 0 else { throw fail("invalid number") }
        }
        return String(decoding: b[start..<i], as: UTF8.self)
    }

    /// Skips decimal digits; how many.
    mutating func digits() -> Int {
        let start = i
        while let c = peek, c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9") { i += 1 }
        return i - start
    }

    /// A string (at its opening quote): runs of raw bytes decoded by `PathCodec`,
    /// escapes appended as the scalars they name.
    mutating func string() throws(FormatError) -> String {
        i += 1
        var scalars = String.UnicodeScalarView()
        var run = i
        let bytes = b
        func flush(_ end: Int) { if run < end { scalars.append(contentsOf: PathCodec.decode(bytes[run..<end]).unicodeScalars) } }
        while true {
            guard let c = peek else { throw fail("unterminated string") }
            switch c {
            case UInt8(ascii: "\""):
                flush(i)
                i += 1
                return String(scalars)
            case UInt8(ascii: "\\"):
                flush(i)
                i += 1
                scalars.append(try escape())
                run = i
            case 0..<0x20:
                throw fail("control character in a string")
            default:
                i += 1
            }
        }
    }

    /// The character of an escape (after its backslash).
    mutating func escape() throws(FormatError) -> Unicode.Scalar {
        guard let e = peek else { throw fail("unterminated string") }
        i += 1
        switch e {
        case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): return Unicode.Scalar(e)
        case UInt8(ascii: "b"): return "\u{08}"
        case UInt8(ascii: "f"): return "\u{0C}"
        case UInt8(ascii: "n"): return "\n"
        case UInt8(ascii: "r"): return "\r"
        case UInt8(ascii: "t"): return "\t"
        case UInt8(ascii: "u"): break
        default: throw fail("invalid escape")
        }
        var scalar = try hex4()
        if (0xD800..<0xDC00).contains(scalar) {
            // A surrogate pair: \uD8xx\uDCxx.
            guard peek == UInt8(ascii: "\\") else { throw fail("unpaired surrogate") }
            i += 1
            guard peek == UInt8(ascii: "u") else { throw fail("unpaired surrogate") }
            i += 1
            let low = try hex4()
            guard (0xDC00..<0xE000).contains(low) else { throw fail("unpaired surrogate") }
            scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
        }
        guard !(rules.refusesNUL && scalar == 0), let u = Unicode.Scalar(scalar) else { throw fail("invalid \\u escape") }
        return u
    }

    mutating func hex4() throws(FormatError) -> UInt32 {
        var v: UInt32 = 0
        for _ in 0..<4 {
            guard let c = peek, let d = Self.hexDigit(c) else { throw fail("invalid \\u escape") }
            v = v << 4 | d
            i += 1
        }
        return v
    }

    static func hexDigit(_ c: UInt8) -> UInt32? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return UInt32(c - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return UInt32(c - UInt8(ascii: "a") + 10)
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return UInt32(c - UInt8(ascii: "A") + 10)
        default: return nil
        }
    }
}
