import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A read-only mapping of a whole file, for hashing large parts of it without copying them
/// (`RunHasher`). A file that shrinks while it is mapped would end the process with SIGBUS
/// at the first touch of a page past its new end: while a mapping lives, such a fault is
/// caught (`BusGuard`), the page reads as zeros from then on, and `shrank` tells the reader
/// not to trust what it read. Nil when the file cannot be mapped (the caller reads it).
final class MappedFile {
    let size: Int
    private let base: UnsafeMutableRawPointer
    private let slot: BusGuard.Slot

    init?(_ file: BlockFile, size: UInt64) {
        guard size > 0, size <= UInt64(Int.max), let slot = BusGuard.claim() else { return nil }
        guard let p = mmap(nil, Int(size), PROT_READ, MAP_SHARED, file.fd, 0), p != UnsafeMutableRawPointer(bitPattern: -1) else {
            slot.release()
            return nil
        }
        _ = madvise(p, Int(size), MADV_SEQUENTIAL)
        base = p
        self.size = Int(size)
        self.slot = slot
        slot.watch(UInt(bitPattern: p), Int(size))
    }

    deinit {
        slot.release()
        _ = munmap(base, size)
    }

    /// `count` bytes at `offset` (inside the mapping: the caller checked it).
    func bytes(_ offset: UInt64, _ count: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: base + Int(offset), count: count)
    }

    /// Unmaps the pages of [offset, offset+count) from this process (they stay in the page
    /// cache, and read again if touched): hashed runs do not add up in the resident size.
    func drop(_ offset: UInt64, _ count: Int) {
        let page = UInt64(BusGuard.pageSize)
        let start = offset / page * page
        _ = madvise(base + Int(start), Int(offset - start) + count, MADV_DONTNEED)
    }

    /// Whether a page was found past the end of the file (it shrank after it was mapped).
    var shrank: Bool { slot.faulted.load(ordering: .acquiring) }
}

/// The SIGBUS handler of `MappedFile`: a fault inside a watched mapping replaces the page
/// with a zero page and marks the mapping; any other fault goes to the handler that was
/// installed before (or the default action: the process ends as it would have).
enum BusGuard {
    final class Slot: Sendable {
        let taken = Atomic<Bool>(false)
        let start = Atomic<UInt>(0)
        let end = Atomic<UInt>(0)
        let faulted = Atomic<Bool>(false)

        func watch(_ address: UInt, _ count: Int) {
            faulted.store(false, ordering: .releasing)
            end.store(address + UInt(count), ordering: .releasing)
            start.store(address, ordering: .releasing)
        }

        func release() {
            start.store(0, ordering: .releasing)
            end.store(0, ordering: .releasing)
            taken.store(false, ordering: .releasing)
        }
    }

    /// Mappings watched at the same time (more: the caller reads instead).
    static let slots: [Slot] = (0..<8).map { _ in Slot() }
    static let pageSize = UInt(max(4096, sysconf(Int32(_SC_PAGESIZE))))
    /// The handler before ours (a pointer: no exclusivity bookkeeping inside the handler).
    nonisolated(unsafe) static let previous: UnsafeMutablePointer<sigaction> = {
        let p = UnsafeMutablePointer<sigaction>.allocate(capacity: 1)
        p.initialize(to: sigaction())
        return p
    }()
    static let installed: Bool = install()

    static func claim() -> Slot? {
        guard installed else { return nil }
        return slots.first { $0.taken.compareExchange(expected: false, desired: true, ordering: .acquiringAndReleasing).exchanged }
    }

    private static func install() -> Bool {
        _ = slots.count  // both set up before the handler can run
        _ = pageSize
        _ = previous
        var action = sigaction()
        action.__sigaction_handler.sa_sigaction = { _, info, _ in
            let address = UInt(bitPattern: info?.pointee._sifields._sigfault.si_addr)
            for s in BusGuard.slots {
                let start = s.start.load(ordering: .acquiring)
                guard start != 0, address >= start, address < s.end.load(ordering: .acquiring) else { continue }
                let page = UnsafeMutableRawPointer(bitPattern: address & ~(BusGuard.pageSize - 1))
                let p = mmap(page, Int(BusGuard.pageSize), PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
                if p == page {
                    s.faulted.store(true, ordering: .releasing)
                    return
                }
            }
            // Not ours: the fault happens again, under the handler from before.
            _ = sigaction(SIGBUS, BusGuard.previous, nil)
        }
        action.sa_flags = SA_SIGINFO
        sigemptyset(&action.sa_mask)
        return sigaction(SIGBUS, &action, previous) == 0
    }
}
