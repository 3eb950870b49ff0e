#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Text formatting that matches qemu-img's human output.
enum Human {
    /// printf-style formatting of one double (e.g. "%0.3g").
    static func format(_ fmt: String, _ value: Double) -> String {
        var buf = [CChar](repeating: 0, count: 64)
        _ = withVaList([value]) { vsnprintf(&buf, buf.count, fmt, $0) }
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// "1 point", "2 points": a count and its noun (English plural: + "s").
    static func count<N: BinaryInteger>(_ n: N, _ noun: String) -> String { "\(n) \(plural(n, noun))" }

    /// The noun for `n` things ("point" or "points").
    static func plural<N: BinaryInteger>(_ n: N, _ noun: String) -> String { n == 1 ? noun : noun + "s" }

    /// qemu's size_to_str: 3 significant digits and a binary suffix ("416 KiB", "1.5 GiB", "0 B").
    static func size(_ value: UInt64) -> String {
        let suffixes = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        var e: Int32 = 0
        _ = frexp(Double(value) / (1000.0 / 1024.0), &e)
        let i = Int((e - 1) / 10)
        let div = Double(UInt64(1) << UInt64(i * 10))
        return format("%0.3g", Double(value) / div) + " " + suffixes[i]
    }

    /// printf "%#-16llx": 0x-prefixed hex (plain "0" for zero), left-aligned in 16 columns.
    static func hexColumn(_ v: UInt64) -> String {
        let s = v == 0 ? "0" : "0x" + String(v, radix: 16)
        return s.count >= 16 ? s : s + String(repeating: " ", count: 16 - s.count)
    }

    /// printf's "%-Ns" / "%Ns": the width counts bytes, as in C.
    static func pad(_ s: String, _ width: Int, left: Bool = true) -> String {
        let n = s.utf8.count
        guard n < width else { return s }
        let fill = String(repeating: " ", count: width - n)
        return left ? s + fill : fill + s
    }

    /// Local time as "%Y-%m-%d %H:%M:%S".
    static func date(_ seconds: UInt32) -> String {
        var t = time_t(seconds)
        var tm = tm()
        localtime_r(&t, &tm)
        var buf = [CChar](repeating: 0, count: 64)
        let n = strftime(&buf, buf.count, "%Y-%m-%d %H:%M:%S", &tm)
        return String(decoding: buf.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
