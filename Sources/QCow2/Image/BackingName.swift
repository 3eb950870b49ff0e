/// Where a backing file name leads, as QEMU resolves it: a plain name is a file
/// (relative names against the overlay's directory); a name with a protocol prefix
/// (a colon before any slash) is taken as it is: `file:NAME` is the file NAME and
/// `json:{...}` a set of block options, of which qimg follows the local-file shapes:
///
///     {"driver": D, "file": {"driver": "file", "filename": F}}
///     {"driver": D, "file.filename": F}          (dotted keys, "file.driver" optional)
///     {"driver": "file", "filename": F}          (the file's bytes, a raw disk)
///
/// D is qcow2 or raw, or absent (probed). The overlay's backing format, when it records
/// one, is the driver (QEMU lets it win over the json's). A relative F is relative to
/// the working directory, not to the overlay's (no directory is added to a protocol
/// name). Anything else (other drivers or protocols, other options) is refused.
public struct BackingLocation: Equatable, Sendable {
    /// The file to open, as QEMU names it (map's file column).
    public var path: String
    /// The format to open it as (nil: probe).
    public var format: ImageFormat?
    /// QEMU's file driver alone, no format driver over it (info's format "file").
    public var protocolOnly = false
}

public enum BackingName {
    /// The protocol of a name like `json:{...}` or `nbd:host:port`, if it has one.
    static func protocolPrefix(_ name: String) -> Substring? {
        guard let colon = name.firstIndex(of: ":") else { return nil }
        let head = name[..<colon]
        return head.contains("/") ? nil : head
    }

    /// The name QEMU reports as the full backing file name (info's actual path).
    public static func fullName(_ name: String, relativeTo overlay: String) -> String {
        if name.hasPrefix("/") || protocolPrefix(name) != nil { return name }
        guard let slash = overlay.lastIndex(of: "/") else { return name }
        return String(overlay[...slash]) + name
    }

    /// Where `name`, stored in (or given for) `overlay` with backing format `format`, leads.
    public static func locate(_ name: String, format: ImageFormat?, relativeTo overlay: String) throws -> BackingLocation {
        guard let proto = protocolPrefix(name) else {
            return BackingLocation(path: fullName(name, relativeTo: overlay), format: format)
        }
        let rest = String(name[name.index(name.startIndex, offsetBy: proto.count + 1)...])
        switch proto {
        case "file":
            return BackingLocation(path: rest, format: format)
        case "json":
            do { return try fromJSON(rest, format: format) } catch let e {
                throw QCow2Error.unsupported(path: overlay, detail: "backing file json: \(e.detail)")
            }
        default:
            throw QCow2Error.unsupported(path: overlay, detail: "backing file protocol '\(proto)' is not supported by qimg (local files only)")
        }
    }

    /// An image named by block options (`--image-opts`, "driver=qcow2,file.filename=X"):
    /// the same shapes as a json: name, the same refusals (`named`: the text, for errors).
    public static func locate(imageOptions: [(key: String, value: String)], named: String) throws -> BackingLocation {
        var opts: [String: JSON] = [:]
        for (k, v) in imageOptions { opts[k] = .string(v) }
        do { return try fromOptions(opts, format: nil) } catch let e {
            throw QCow2Error.unsupported(path: named, detail: e.detail)
        }
    }

    static func fromJSON(_ text: String, format: ImageFormat?) throws(FormatError) -> BackingLocation {
        guard case .object(let members) = try JSON.parse(text, rules: .qemu) else {
            throw FormatError("json", "the options are not a JSON object")
        }
        var opts: [String: JSON] = [:]
        try flatten(members, prefix: "", into: &opts)
        return try fromOptions(opts, format: format)
    }

    /// The shapes qimg follows, over flattened (dotted) options.
    static func fromOptions(_ options: [String: JSON], format: ImageFormat?) throws(FormatError) -> BackingLocation {
        var opts = options
        func string(_ key: String) throws(FormatError) -> String? {
            guard let v = opts.removeValue(forKey: key) else { return nil }
            guard case .string(let s) = v else { throw FormatError("json", "option '\(key)' is not a string") }
            return s
        }
        let jsonDriver = try string("driver")
        let driver = format?.rawValue ?? jsonDriver
        let location: BackingLocation
        switch driver {
        case "file":
            guard let f = try string("filename"), !f.isEmpty else { throw FormatError("json", "driver 'file' needs a filename") }
            location = BackingLocation(path: f, format: .raw, protocolOnly: true)
        case nil, "qcow2", "raw":
            let proto = try string("file.driver") ?? "file"
            guard proto == "file" else { throw FormatError("json", "protocol '\(proto)' is not supported by qimg (local files only)") }
            guard let f = try string("file.filename"), !f.isEmpty else {
                throw FormatError("json", "no file.filename (qimg follows local files only)")
            }
            location = BackingLocation(path: f, format: driver.flatMap { ImageFormat(rawValue: $0) })
        case let d?:
            throw FormatError("json", "driver '\(d)' is not supported by qimg (qcow2, raw and file only)")
        }
        if let extra = opts.keys.sorted().first {
            throw FormatError("json", "option '\(extra)' is not supported by qimg")
        }
        return location
    }

    /// QEMU's flattening: nested objects become dotted keys; a key given twice is an error.
    private static func flatten(_ members: [(String, JSON)], prefix: String,
                                into out: inout [String: JSON]) throws(FormatError) {
        for (k, v) in members {
            let key = prefix + k
            switch v {
            case .object(let inner): try flatten(inner, prefix: key + ".", into: &out)
            case .array: throw FormatError("json", "option '\(key)' is a list, which qimg does not support")
            default:
                guard out.updateValue(v, forKey: key) == nil else { throw FormatError("json", "option '\(key)' is given twice") }
            }
        }
    }
}
