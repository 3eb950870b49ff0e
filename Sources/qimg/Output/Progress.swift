#if canImport(Glibc)
import Glibc
#endif

/// Progress of a copy (`-p`), over the bytes the copy has to move (qemu-img counts the
/// allocated data, so a sparse image reaches 100%). Off a terminal it prints exactly what
/// qemu-img prints: `    (P/100%)\r` at the start, whenever the figure has grown by at
/// least 1%, and `(100.00/100%)` then a newline at the end. On a terminal the line is
/// redrawn at most ten times a second with bytes, rate and ETA. Never goes backwards.
final class ProgressReporter {
    let enabled: Bool
    let tty: Bool
    let start: Double
    private var lastDraw: Double = 0
    private var lastPrinted: Double = -1
    private var finished = false

    init(enabled: Bool) {
        self.enabled = enabled
        self.tty = isatty(1) != 0
        self.start = Self.now()
        if enabled && !tty { print(0) }
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    func update(_ done: UInt64, _ total: UInt64) {
        guard enabled, !finished else { return }
        let pct = total == 0 ? 100 : min(100, Double(done) * 100 / Double(total))
        guard pct > lastPrinted else { return }
        if tty {
            let t = Self.now()
            guard t - lastDraw > 0.1 || pct == 100 else { return }
            lastDraw = t
            lastPrinted = pct
            let rate = Double(done) / max(t - start, 0.001)
            let eta = rate > 0 && total > done ? Double(total - done) / rate : 0
            Output.out("\r    (\(Human.format("%.2f", pct))/100%) \(Human.size(done)) of \(Human.size(total)), \(Human.size(UInt64(rate)))/s, ETA \(Int(eta)) s   ")
        } else if pct >= lastPrinted + 1 || pct == 100 {
            print(pct)
        }
    }

    private func print(_ pct: Double) {
        lastPrinted = pct
        Output.out("    (\(Human.format("%.2f", pct))/100%)\r")
    }

    /// The end of the copy: 100% when it succeeded, then the line is ended.
    func finish(succeeded: Bool) {
        guard enabled, !finished else { return }
        if succeeded {
            if tty { if lastPrinted < 100 { Output.out("\r    (100.00/100%)") } } else { print(100) }
        }
        finished = true
        Output.out("\n")
    }
}
