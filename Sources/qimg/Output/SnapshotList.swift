import QCow2

/// qemu-img's snapshot table ("Snapshot list:" in info, the output of snapshot -l):
/// nothing when there are no snapshots.
enum SnapshotList {
    static func text(_ snapshots: [ImageInfo.Snapshot]) -> String {
        guard !snapshots.isEmpty else { return "" }
        var s = "Snapshot list:\n"
        s += Human.pad("ID", 10) + Human.pad("TAG", 17) + Human.pad("VM SIZE", 8, left: false)
            + Human.pad("DATE", 20, left: false) + Human.pad("VM CLOCK", 13, left: false)
            + Human.pad("ICOUNT", 11, left: false) + "\n"
        for sn in snapshots {
            let secs = sn.vmClockNanoseconds / 1_000_000_000
            let clock = twoDigits(secs / 3600) + ":" + twoDigits((secs / 60) % 60) + ":" + twoDigits(secs % 60)
                + "." + threeDigits((sn.vmClockNanoseconds / 1_000_000) % 1000)
            let icount = sn.icount.flatMap { $0 == -1 ? nil : String($0) } ?? ""
            s += Human.pad(sn.id, 9) + " " + Human.pad(sn.name, 16) + " "
                + Human.pad(Human.size(sn.vmStateSize), 8, left: false)
                + Human.pad(Human.date(sn.dateSeconds), 20, left: false)
                + Human.pad(clock, 13, left: false) + Human.pad(icount, 11, left: false) + "\n"
        }
        return s
    }

    static func twoDigits(_ v: UInt64) -> String { v < 10 ? "0\(v)" : "\(v)" }
    static func threeDigits(_ v: UInt64) -> String { v < 10 ? "00\(v)" : v < 100 ? "0\(v)" : "\(v)" }
}
