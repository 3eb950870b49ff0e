/// Text for stdout built as bytes and written in large pieces: for outputs of thousands of
/// lines (map), where appending to a String (and scanning it for escaped file-name bytes
/// before each write) cost more than finding the extents. ASCII only: file names go
/// through `Output.out`.
struct OutputBuffer {
    private var bytes: [UInt8] = []
    /// Bytes collected before a write.
    private let flushSize = 1 << 16
    /// Digits of a number, least significant first (reused).
    private var digits = [UInt8](repeating: 0, count: 20)

    init() { bytes.reserveCapacity(flushSize + 256) }

    mutating func append(_ s: StaticString) {
        s.withUTF8Buffer { bytes.append(contentsOf: $0) }
    }

    /// `n` in decimal.
    mutating func append(_ n: UInt64) {
        var v = n
        var count = 0
        repeat {
            digits[count] = UInt8(truncatingIfNeeded: v % 10) + 0x30
            v /= 10
            count += 1
        } while v > 0
        while count > 0 {
            count -= 1
            bytes.append(digits[count])
        }
    }

    mutating func append(_ n: Int) { append(UInt64(clamping: n)) }

    mutating func append(_ b: Bool) { append(b ? "true" : "false") }

    /// Writes what is collected once it reaches the flush size (all of it with `force`).
    mutating func flush(force: Bool = false) {
        guard force || bytes.count >= flushSize else { return }
        Output.out(bytes: bytes)
        bytes.removeAll(keepingCapacity: true)
    }
}
