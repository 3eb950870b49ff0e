#if canImport(Glibc)
import Glibc
#endif

/// UTC times of restore points: seconds since the epoch, written as ISO-8601
/// (`2026-12-03T08:31:46Z`) in the manifest and compactly (`20261203T083146Z`) in file
/// names. No time zone database: only UTC and explicit offsets are read.
public enum RepositoryTime {
    public static func now() -> Int64 { Int64(time(nil)) }

    /// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    static func days(year: Int64, month: Int64, day: Int64) -> Int64 {
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let mp = (month + 9) % 12
        let doy = (153 * mp + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146097 + doe - 719468
    }

    static func civil(_ t: Int64) -> (y: Int64, mo: Int64, d: Int64, h: Int64, mi: Int64, s: Int64) {
        let z0 = t >= 0 ? t / 86400 : (t - 86399) / 86400
        let secs = t - z0 * 86400
        let z = z0 + 719468
        let era = (z >= 0 ? z : z - 146096) / 146097
        let doe = z - era * 146097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        return (yoe + era * 400 + (m <= 2 ? 1 : 0), m, d, secs / 3600, secs % 3600 / 60, secs % 60)
    }

    static func pad(_ v: Int64, _ n: Int) -> String {
        let s = String(v)
        return String(repeating: "0", count: max(0, n - s.count)) + s
    }

    public static func iso(_ t: Int64) -> String {
        let c = civil(t)
        return "\(pad(c.y, 4))-\(pad(c.mo, 2))-\(pad(c.d, 2))T\(pad(c.h, 2)):\(pad(c.mi, 2)):\(pad(c.s, 2))Z"
    }

    public static func compact(_ t: Int64) -> String {
        let c = civil(t)
        return "\(pad(c.y, 4))\(pad(c.mo, 2))\(pad(c.d, 2))T\(pad(c.h, 2))\(pad(c.mi, 2))\(pad(c.s, 2))Z"
    }

    /// `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM[:SS]` with `Z`, `±HH:MM` or nothing (UTC);
    /// a space may stand for the `T`. nil for anything else.
    public static func parse(_ text: String) -> Int64? {
        let b = Array(text.utf8)
        func num(_ at: Int, _ n: Int) -> Int64? {
            guard at + n <= b.count else { return nil }
            var v: Int64 = 0
            for c in b[at..<at + n] { guard c >= 0x30, c <= 0x39 else { return nil }; v = v * 10 + Int64(c - 0x30) }
            return v
        }
        func at(_ i: Int, _ c: Character) -> Bool { i < b.count && b[i] == c.asciiValue }
        guard let y = num(0, 4), at(4, "-"), let mo = num(5, 2), at(7, "-"), let d = num(8, 2),
              (1...12).contains(mo), (1...31).contains(d) else { return nil }
        var t = days(year: y, month: mo, day: d) * 86400
        guard civil(t).d == d else { return nil }  // e.g. February 30
        if b.count == 10 { return t }
        guard at(10, "T") || at(10, " "), let h = num(11, 2), at(13, ":"), let mi = num(14, 2), h < 24, mi < 60 else { return nil }
        t += h * 3600 + mi * 60
        var i = 16
        if at(16, ":") {
            guard let s = num(17, 2), s < 60 else { return nil }
            t += s
            i = 19
        }
        if i == b.count || (at(i, "Z") && i + 1 == b.count) { return t }
        guard at(i, "+") || at(i, "-"), let oh = num(i + 1, 2), at(i + 3, ":"), let om = num(i + 4, 2), i + 6 == b.count,
              oh < 24, om < 60 else { return nil }
        let offset = oh * 3600 + om * 60
        return at(i, "+") ? t - offset : t + offset
    }
}
