import Testing

extension Runner {
    /// `qemu-img check [-U] FILE` in `dir`: nil when it finds nothing wrong (exit 0; with
    /// `leaksAllowed`, exit 3 too: leaked clusters only), else what it said.
    public static func qemuCheckProblem(_ file: String, _ dir: String, leaksAllowed: Bool = false,
                                        forceShare: Bool = false) throws -> String? {
        let r = try qemuImg(["check"] + (forceShare ? ["-U"] : []) + [file], cwd: dir)
        if r.exitedNormally && (r.status == 0 || (leaksAllowed && r.status == 3)) { return nil }
        let lines = (r.out + r.err).split(separator: "\n").prefix(20).joined(separator: "\n    ")
        return "qemu-img check \(file): \(r.summary)\n    \(lines)"
    }
}

/// Records an issue unless `qemu-img check FILE` (in `dir`) finds nothing wrong (exit 0;
/// with `leaksAllowed`, leaked clusters are fine too).
public func expectCheckClean(_ file: String, _ dir: String, _ label: String, leaksAllowed: Bool = false,
                             sourceLocation: SourceLocation = #_sourceLocation) throws {
    if let problem = try Runner.qemuCheckProblem(file, dir, leaksAllowed: leaksAllowed) {
        Issue.record("\(label): \(problem)", sourceLocation: sourceLocation)
    }
}
