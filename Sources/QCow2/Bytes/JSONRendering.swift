/// JSON text for a `JSON` value (the manifest, repository listings) and QEMU's
/// quoting of strings (the CLI's qemu-img output).
extension JSON {
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
        case .number(let text): out += text
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
}
