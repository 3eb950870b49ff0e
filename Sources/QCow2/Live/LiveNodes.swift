/// A dirty bitmap of a running QEMU's node, as `query-named-block-nodes` reports it.
public struct LiveBitmap: Sendable, Equatable {
    public var name: String
    public var recording: Bool
    public var busy: Bool
    public var persistent: Bool
    public var inconsistent: Bool
    public var count: UInt64
    public var granularity: UInt64?
}

/// A block node of a running QEMU: its name, virtual size and named bitmaps.
public struct LiveNode: Sendable {
    public var name: String
    public var virtualSize: UInt64
    public var bitmaps: [LiveBitmap]
    /// The file QEMU opened for it, as it reports it (`file`).
    public var file: String?

    public func bitmap(_ name: String) -> LiveBitmap? { bitmaps.first { $0.name == name } }
}

/// The nodes of a running QEMU, and the lookup of a name the user gave (a node name, a
/// `-drive` device id or a device's qdev id/path, as QMP commands accept).
public enum LiveNodes {
    /// Every named node (`query-named-block-nodes`, flat).
    public static func all(_ qmp: QMPConnection) throws(QCow2Error) -> [LiveNode] {
        guard case .array(let items) = try qmp.execute("query-named-block-nodes", [("flat", .bool(true))]) else {
            throw qmp.fail(.protocolError, "query-named-block-nodes: the reply is not a list")
        }
        return items.compactMap(node)
    }

    /// The node `name` stands for, with its current state.
    public static func find(_ name: String, _ qmp: QMPConnection) throws(QCow2Error) -> LiveNode {
        let nodes = try all(qmp)
        if let n = nodes.first(where: { $0.name == name }) { return n }
        // A BlockBackend's device id or its device's qdev id/path names its root node.
        if case .array(let backends) = try qmp.execute("query-block") {
            for b in backends {
                let device = b["device"].flatMap(string), qdev = b["qdev"].flatMap(string)
                let matches = device == name || qdev == name || qdev.map { $0.hasPrefix("/machine/peripheral/\(name)/") } == true
                if matches, let root = b["inserted"]?["node-name"].flatMap(string),
                   let n = nodes.first(where: { $0.name == root }) {
                    return n
                }
            }
        }
        throw qmp.fail(.nodeNotFound, "no block node, device or qdev named '\(name)'")
    }

    static func string(_ j: JSON) -> String? {
        if case .string(let s) = j { return s }
        return nil
    }

    static func bool(_ j: JSON?) -> Bool {
        if case .bool(let b)? = j { return b }
        return false
    }

    static func node(_ j: JSON) -> LiveNode? {
        guard let name = j["node-name"].flatMap(string), let size = j["image"]?["virtual-size"]?.uint64 else { return nil }
        var bitmaps: [LiveBitmap] = []
        if case .array(let list)? = j["dirty-bitmaps"] {
            for b in list {
                // Anonymous bitmaps (a running job's successors) have no name.
                guard let n = b["name"].flatMap(string) else { continue }
                bitmaps.append(LiveBitmap(name: n, recording: bool(b["recording"]), busy: bool(b["busy"]),
                                          persistent: bool(b["persistent"]), inconsistent: bool(b["inconsistent"]),
                                          count: b["count"]?.uint64 ?? 0, granularity: b["granularity"]?.uint64))
            }
        }
        return LiveNode(name: name, virtualSize: size, bitmaps: bitmaps, file: j["file"].flatMap(string))
    }
}
