/// JSON text for a `JSON` value (the manifest, repository listings) and QEMU's
/// quoting of strings (the CLI's qemu-img output).
extension JSON {
    /// Compact when `indent` is nil, else pretty with that many spaces a level.
    public func rendered(indent: Int? = 2) -> String {
        String(decoding: renderedBytes(indent: indent), as: UTF8.self)
    }

    /// `rendered`'s UTF-8, built as bytes (a manifest of thousands of runs is rendered at
    /// every change; appending to a String piece by piece was the slow part).
    public func renderedBytes(indent: Int? = 2) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(4096)
        write(into: &out, level: 0, indent: indent)
        return out
    }

    private func write(into out: inout [UInt8], level: Int, indent: Int?) {
        func newline() { if indent != nil { out.append(0x0A) } }
        func pad(_ l: Int) { out.append(contentsOf: repeatElement(0x20, count: (indent ?? 0) * l)) }
        switch self {
        case .object(let pairs):
            if pairs.isEmpty { out += [0x7B, 0x7D]; return }
            out.append(0x7B)
            newline()
            for (i, (k, v)) in pairs.enumerated() {
                pad(level + 1)
                JSON.appendQuoted(k, to: &out)
                out.append(0x3A)
                if indent != nil { out.append(0x20) }
                v.write(into: &out, level: level + 1, indent: indent)
                if i != pairs.count - 1 { out.append(0x2C) }
                newline()
            }
            pad(level)
            out.append(0x7D)
        case .array(let items):
            // Arrays of scalars stay on one line.
            let flat = indent == nil || items.allSatisfy { if case .object = $0 { return false }; if case .array = $0 { return false }; return true }
            if items.isEmpty { out += [0x5B, 0x5D]; return }
            out.append(0x5B)
            if !flat { newline() }
            for (i, v) in items.enumerated() {
                if !flat { pad(level + 1) }
                v.write(into: &out, level: level + 1, indent: flat ? nil : indent)
                if i != items.count - 1 {
                    out.append(0x2C)
                    if flat { if indent != nil { out.append(0x20) } } else { newline() }
                }
            }
            if !flat { newline(); pad(level) }
            out.append(0x5D)
        case .string(let s): JSON.appendQuoted(s, to: &out)
        case .number(let text): out.append(contentsOf: text.utf8)
        case .bool(let b): out.append(contentsOf: (b ? "true" : "false").utf8)
        case .null: out.append(contentsOf: "null".utf8)
        }
    }

    /// `quote(s)`'s UTF-8: a string of printable ASCII without `"` or `\\` as it is, any
    /// other through `quote`.
    static func appendQuoted(_ s: String, to out: inout [UInt8]) {
        let plain = s.utf8.allSatisfy { $0 >= 0x20 && $0 < 0x7F && $0 != 0x22 && $0 != 0x5C }
        if plain {
            out.append(0x22)
            out.append(contentsOf: s.utf8)
            out.append(0x22)
        } else {
            out.append(contentsOf: quote(s).utf8)
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
