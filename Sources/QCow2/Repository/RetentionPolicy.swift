/// Which restore points a prune keeps, on their recorded times (as restic's policies): the
/// newest `last` points, the newest point of each of the newest `daily` days (UTC), of the
/// newest `weekly` weeks (Monday to Sunday) and of the newest `monthly` months that have
/// points. The chain's newest point is always kept: the image's bitmap records the changes
/// since it.
public struct RetentionPolicy: Equatable, Sendable {
    public var last = 0
    public var daily = 0
    public var weekly = 0
    public var monthly = 0
    public init(last: Int = 0, daily: Int = 0, weekly: Int = 0, monthly: Int = 0) {
        self.last = last
        self.daily = daily
        self.weekly = weekly
        self.monthly = monthly
    }

    public var isEmpty: Bool { last <= 0 && daily <= 0 && weekly <= 0 && monthly <= 0 }

    /// The ids kept among `points` (oldest first).
    public func kept(_ points: [RepositoryManifest.Point]) -> Set<String> {
        var keep = Set(points.suffix(max(0, last)).map(\.id))
        if let newest = points.last { keep.insert(newest.id) }
        func byPeriod(_ n: Int, _ period: (Int64) -> Int64) {
            guard n > 0 else { return }
            var seen = Set<Int64>()
            for p in points.reversed() {
                let k = period(p.time)
                if seen.contains(k) { continue }
                guard seen.count < n else { break }
                seen.insert(k)
                keep.insert(p.id)
            }
        }
        func day(_ t: Int64) -> Int64 { t >= 0 ? t / 86400 : (t - 86399) / 86400 }
        byPeriod(daily, day)
        // 1970-01-01 was a Thursday: weeks counted from Monday 1969-12-29.
        byPeriod(weekly) { t in let d = day(t) + 3; return d >= 0 ? d / 7 : (d - 6) / 7 }
        byPeriod(monthly) { t in let c = RepositoryTime.civil(t); return c.y * 12 + c.mo }
        return keep
    }
}
