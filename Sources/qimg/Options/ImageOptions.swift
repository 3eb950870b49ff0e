import QCow2

/// `-o key=value,key=value` lists as qemu-img parses them: a doubled comma is a
/// literal comma, `help` or `?` asks for the option list, later values win.
struct OptionList {
    var values: [(key: String, value: String)] = []
    var help = false
    /// Every item in order, `help` and `?` included (as keys with the value "on").
    var items: [(key: String, value: String)] = []

    init(_ lists: [String]) throws {
        for list in lists {
            guard !list.isEmpty, !list.hasPrefix(","), !(list.hasSuffix(",") && !list.hasSuffix(",,")) else {
                throw CommandFailure(message: "Invalid option list: \(list)")
            }
            var items: [String] = []
            var cur = ""
            var chars = Array(list)
            var i = 0
            while i < chars.count {
                if chars[i] == "," {
                    if i + 1 < chars.count && chars[i + 1] == "," { cur.append(","); i += 2; continue }
                    items.append(cur); cur = ""
                } else {
                    cur.append(chars[i])
                }
                i += 1
            }
            items.append(cur)
            chars.removeAll()
            for item in items {
                if item == "help" || item == "?" {
                    help = true
                    self.items.append((item, "on"))
                    continue
                }
                if let eq = item.firstIndex(of: "=") {
                    values.append((String(item[..<eq]), String(item[item.index(after: eq)...])))
                } else {
                    values.append((item, "on"))
                }
                self.items.append(values[values.count - 1])
            }
        }
    }

    /// The last value given for `key`.
    func value(_ key: String) -> String? { values.last { $0.key == key }?.value }

    static func bool(_ key: String, _ v: String) throws -> Bool {
        switch v {
        case "on", "yes", "true", "y": return true
        case "off", "no", "false", "n": return false
        default: throw CommandFailure(message: "Parameter '\(key)' expects 'on' or 'off'")
        }
    }

    /// qemu-img's verdict, at image creation, on `encryption=V` (V already a valid bool):
    /// only the literal "off" creates an image; "on" asks for a key qimg cannot take.
    static func encryptionRefusal(_ v: String) -> String? {
        switch v {
        case "off": return nil
        case "on": return "Parameter 'encrypt.key-secret' is required for cipher"
        default: return "Parameter 'format' does not accept value '\(v)'"
        }
    }

    static func size(_ key: String, _ v: String) throws -> UInt64 {
        guard let n = SizeArgument.parse(v) else {
            throw CommandFailure(message: "Parameter '\(key)' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.")
        }
        return n
    }

    static func number(_ key: String, _ v: String) throws -> Int {
        guard let n = Int(v), n >= 0 else { throw CommandFailure(message: "Parameter '\(key)' expects a number") }
        return n
    }

    /// Applies the qcow2 format options (cluster_size, refcount_bits, lazy_refcounts,
    /// extended_l2, compat, compression_type) to `o`. Returns the first error qemu-img
    /// reports only after printing its "Formatting" line (nil if none).
    func applyQCow2Options(to o: inout CreateOptions) throws -> String? {
        var late: String?
        if let v = value("cluster_size") { o.clusterSize = Int(clamping: try OptionList.size("cluster_size", v)) }
        if let v = value("refcount_bits") { o.refcountBits = try OptionList.number("refcount_bits", v) }
        if let v = value("lazy_refcounts") { o.lazyRefcounts = try OptionList.bool("lazy_refcounts", v) }
        if let v = value("extended_l2") { o.extendedL2 = try OptionList.bool("extended_l2", v) }
        if let v = value("compat") {
            switch v {
            case "0.10", "v2": o.version = 2
            case "1.1", "v3": o.version = 3
            default: late = "Parameter 'version' does not accept value '\(v)'"
            }
        }
        if let v = value("compression_type") {
            switch v {
            case "zlib": o.compressionType = .zlib
            case "zstd": o.compressionType = .zstd
            default: late = late ?? "Parameter 'compression-type' does not accept value '\(v)'"
            }
        }
        return late
    }
}
