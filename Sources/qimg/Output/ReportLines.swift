#if canImport(Glibc)
import Glibc
#endif

/// Diagnostic lines on stderr, written in blocks: a damaged image can produce
/// millions of check/repair lines, and one write(2) per line dominated the run.
/// Callers flush before anything goes to stdout, so the two streams keep their order.
final class ReportLines {
    private var buffer: [UInt8] = []
    private let limit = 64 * 1024

    init() { buffer.reserveCapacity(limit + 256) }

    func add(_ line: String) {
        buffer.append(contentsOf: line.utf8)
        buffer.append(0x0A)
        if buffer.count >= limit { flush() }
    }

    func flush() {
        guard !buffer.isEmpty else { return }
        buffer.withUnsafeBufferPointer { b in
            var done = 0
            while done < b.count {
                let n = write(2, b.baseAddress! + done, b.count - done)
                if n < 0 { if errno == EINTR { continue }; break }
                done += n
            }
        }
        buffer.removeAll(keepingCapacity: true)
    }

    deinit { flush() }
}
