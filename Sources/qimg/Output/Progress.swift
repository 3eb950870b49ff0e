#if canImport(Glibc)
import Glibc
#endif

/// Progress for long copies: on a terminal a redrawn line (percent, bytes, rate, ETA);
/// otherwise a plain line every 10%.
final class ProgressReporter {
    let enabled: Bool
    let tty: Bool
    let start: Double
    var lastDraw: Double = 0
    var lastTenth = -1

    init(enabled: Bool) {
        self.enabled = enabled
        self.tty = isatty(1) != 0
        self.start = Self.now()
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    func update(_ done: UInt64, _ total: UInt64) {
        guard enabled, total > 0 else { return }
        let t = Self.now()
        let pct = Double(done) * 100 / Double(total)
        if tty {
            guard t - lastDraw > 0.1 || done == total else { return }
            lastDraw = t
            let rate = Double(done) / max(t - start, 0.001)
            let eta = rate > 0 ? Double(total - done) / rate : 0
            Output.out("\r    (\(Human.format("%.2f", pct))/100%) \(Human.size(done)) of \(Human.size(total)), \(Human.size(UInt64(rate)))/s, ETA \(Int(eta)) s   ")
        } else {
            let tenth = Int(pct / 10)
            guard tenth > lastTenth else { return }
            lastTenth = tenth
            Output.out("    (\(Human.format("%.2f", pct))/100%)\n")
        }
    }

    func finish() {
        if enabled && tty { Output.out("\n") }
    }
}
