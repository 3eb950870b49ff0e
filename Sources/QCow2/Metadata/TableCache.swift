/// A fixed-capacity cache of cluster-sized metadata tables (L2 tables, refcount
/// blocks), keyed by host offset, evicting the least recently used. Its memory is
/// bounded by `capacity * tableBytes` whatever the image size.
final class TableCache {
    let tableBytes: Int
    let capacity: Int
    private var tables: [[UInt8]] = []
    private var keys: [UInt64] = []
    private var lastUse: [UInt64] = []
    private var slotOf: [UInt64: Int] = [:]
    private var tick: UInt64 = 0
    private(set) var misses = 0

    /// `budget` is the byte cap; at least 4 tables are kept.
    init(tableBytes: Int, budget: Int) {
        self.tableBytes = tableBytes
        self.capacity = max(4, budget / tableBytes)
    }

    /// Returns the table at `offset`, loading it with `load` on a miss.
    func table(at offset: UInt64, load: (inout [UInt8]) throws -> Void) throws -> [UInt8] {
        tick &+= 1
        if let s = slotOf[offset] {
            lastUse[s] = tick
            return tables[s]
        }
        misses += 1
        var buf = [UInt8](repeating: 0, count: tableBytes)
        try load(&buf)
        let slot: Int
        if tables.count < capacity {
            slot = tables.count
            tables.append(buf)
            keys.append(offset)
            lastUse.append(tick)
        } else {
            var victim = 0
            var oldest = UInt64.max
            for i in 0..<lastUse.count where lastUse[i] < oldest {
                oldest = lastUse[i]
                victim = i
            }
            slotOf[keys[victim]] = nil
            slot = victim
            tables[slot] = buf
            keys[slot] = offset
            lastUse[slot] = tick
        }
        slotOf[offset] = slot
        return buf
    }

    var residentBytes: Int { tables.count * tableBytes }

    /// Replaces the cached copy of the table at `offset` (after it was written to disk).
    func update(_ offset: UInt64, _ table: [UInt8]) {
        if let s = slotOf[offset] { tables[s] = table }
    }

    /// Forgets the table at `offset` (freed or moved).
    func invalidate(_ offset: UInt64) {
        if let s = slotOf[offset] {
            slotOf[offset] = nil
            keys[s] = .max
            lastUse[s] = 0
        }
    }
}
