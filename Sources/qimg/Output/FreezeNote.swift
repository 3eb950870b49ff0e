import QCow2

/// What `--freeze` did, for a live backup's summary line: filesystems a killed run had
/// left frozen and this run thawed first, and those frozen for this backup's start.
enum FreezeNote {
    static func text(_ freeze: GuestFreeze?) -> String {
        guard let freeze else { return "" }
        func filesystems(_ n: Int) -> String { n == 1 ? "1 guest filesystem" : "\(n) guest filesystems" }
        var s = ""
        if let n = freeze.thawedLeftover { s += "; thawed \(filesystems(n)) an earlier run had left frozen" }
        if let n = freeze.frozen { s += "; \(filesystems(n)) frozen for the start (\(Human.format("%.2f", freeze.frozenSeconds)) s)" }
        return s
    }
}
