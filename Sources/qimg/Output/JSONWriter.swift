import QCow2
/// A JSON value printed the way QEMU prints its QObjects: objects list their
/// keys in QDict hash-table order (not insertion order), 4-space indentation.
indirect enum JSONValue {
    case object([(String, JSONValue)])
    case array([JSONValue])
    case string(String)
    case int(Int64)
    case uint(UInt64)
    case bool(Bool)
}

enum QemuJSON {
    /// QDict's bucket for a key: QEMU hashes keys into 512 buckets and iterates
    /// buckets in order, newest entry first within a bucket.
    static func bucket(_ key: String) -> UInt32 {
        let bytes = Array(key.utf8)
        var v: UInt32 = 0x238F_13AF &* UInt32(truncatingIfNeeded: bytes.count)
        for (i, c) in bytes.enumerated() {
            v = v &+ (UInt32(c) << UInt32(i * 5 % 24))
        }
        return (1_103_515_243 &* v &+ 12345) % 512
    }

    /// Keys of an object in the order QEMU prints them.
    static func ordered(_ pairs: [(String, JSONValue)]) -> [(String, JSONValue)] {
        let indexed = pairs.enumerated().map { (bucket: bucket($0.element.0), index: $0.offset, pair: $0.element) }
        return indexed.sorted { a, b in
            a.bucket != b.bucket ? a.bucket < b.bucket : a.index > b.index
        }.map(\.pair)
    }

    static func render(_ v: JSONValue) -> String {
        var out = ""
        write(v, indent: 0, into: &out)
        return out
    }

    static func write(_ v: JSONValue, indent: Int, into out: inout String) {
        let pad = String(repeating: " ", count: (indent + 1) * 4)
        let closePad = String(repeating: " ", count: indent * 4)
        switch v {
        case .object(let pairs):
            if pairs.isEmpty { out += "{\n" + closePad + "}"; return }
            out += "{\n"
            for (i, (k, val)) in ordered(pairs).enumerated() {
                out += pad + quote(k) + ": "
                write(val, indent: indent + 1, into: &out)
                out += i == pairs.count - 1 ? "\n" : ",\n"
            }
            out += closePad + "}"
        case .array(let items):
            if items.isEmpty { out += "[\n" + closePad + "]"; return }
            out += "[\n"
            for (i, item) in items.enumerated() {
                out += pad
                write(item, indent: indent + 1, into: &out)
                out += i == items.count - 1 ? "\n" : ",\n"
            }
            out += closePad + "]"
        case .string(let s): out += quote(s)
        case .int(let n): out += String(n)
        case .uint(let n): out += String(n)
        case .bool(let b): out += b ? "true" : "false"
        }
    }

    /// QEMU's string quoting: control and non-ASCII characters as \uXXXX.
    static func quote(_ s: String) -> String { JSON.quote(s, qemu: true) }
}
