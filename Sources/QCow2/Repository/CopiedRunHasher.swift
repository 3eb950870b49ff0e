#if canImport(Glibc)
import Glibc
#endif
import Dispatch

/// The SHA-256 of each data run of a point, computed while the copy writes the point: a
/// `CopyObserver` that copies each written piece into a fixed ring of slots and hashes the
/// filled slots on another thread, so that the copy's thread only pays a memcpy (and waits
/// only when the hashing falls a whole ring behind). Runs are formed as `PointDigest`
/// forms them from the finished file: contiguous guest data, cut at every
/// `PointDigest.maxRun` boundary. Memory: the ring (`slotCount` × `slotSize`).
final class CopiedRunHasher: CopyObserver, @unchecked Sendable {
    static let slotSize = 2 << 20
    static let slotCount = 4

    private let slots: [UnsafeMutableRawBufferPointer]
    /// Free slots; filled ones are hashed in order, so the next one to fill is the oldest.
    private let free = DispatchSemaphore(value: CopiedRunHasher.slotCount)
    private let queue = DispatchQueue(label: "qimg.copied-run-hasher")
    private let group = DispatchGroup()

    // The copy's thread: the slot being filled and its pieces (guest offset, slot offset, count).
    private var current = 0
    private var holding = false
    private var filled = 0
    private var pieces: [Piece] = []

    // The hashing thread (the queue) only, until `finish` has waited for it.
    private var runStart: UInt64 = 0
    private var runEnd: UInt64 = 0
    private var context: SHA256?
    private var runs: [RepositoryManifest.DataRun] = []
    private var failed = false

    struct Piece { var guest: UInt64; var at: Int; var count: Int }

    /// Throws when libcrypto is missing (before anything is copied).
    init() throws {
        _ = try SHA256()
        slots = (0..<Self.slotCount).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: Self.slotSize, alignment: 4096) }
    }

    deinit {
        group.wait()
        if holding { free.signal() }  // a semaphore must not go below its start value
        slots.forEach { $0.deallocate() }
    }

    func wroteData(_ bytes: UnsafeRawBufferPointer, at guest: UInt64) throws {
        var done = 0
        while done < bytes.count {
            if !holding {
                free.wait()
                holding = true
            }
            let n = min(bytes.count - done, Self.slotSize - filled)
            UnsafeMutableRawBufferPointer(rebasing: slots[current][filled..<(filled + n)])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[done..<(done + n)]))
            if let last = pieces.last, last.guest + UInt64(last.count) == guest + UInt64(done) {
                pieces[pieces.count - 1].count += n
            } else {
                pieces.append(Piece(guest: guest + UInt64(done), at: filled, count: n))
            }
            filled += n
            done += n
            if filled == Self.slotSize { submit() }
        }
    }

    /// The runs of everything reported, once hashed (call once, after the copy).
    func finish() throws -> [RepositoryManifest.DataRun] {
        if holding { submit() }
        group.wait()
        return try queue.sync {
            closeRun()
            guard !failed else { throw QCow2Error.unsupported(path: "libcrypto", detail: "cannot set up a SHA-256 context") }
            return runs
        }
    }

    private func submit() {
        let work = UncheckedSendable((slots[current], pieces))
        queue.async(group: group) {
            let (slot, pieces) = work.value
            for p in pieces { self.hash(UnsafeRawBufferPointer(rebasing: slot[p.at..<(p.at + p.count)]), at: p.guest) }
            self.free.signal()
        }
        current = (current + 1) % Self.slotCount
        holding = false
        filled = 0
        pieces = []
    }

    /// On the queue: `bytes` at `guest` continue the open run or start new ones.
    private func hash(_ bytes: UnsafeRawBufferPointer, at guest: UInt64) {
        var g = guest
        var done = 0
        while done < bytes.count {
            let n = min(bytes.count - done, Int(PointDigest.maxRun - g % PointDigest.maxRun))
            if context == nil || runEnd != g || g % PointDigest.maxRun == 0 {
                closeRun()
                runStart = g
                runEnd = g
                do { context = try SHA256() } catch { failed = true }
            }
            context?.update(UnsafeRawBufferPointer(rebasing: bytes[done..<(done + n)]))
            runEnd += UInt64(n)
            g += UInt64(n)
            done += n
        }
    }

    private func closeRun() {
        guard runEnd > runStart else { return }
        runs.append(RepositoryManifest.DataRun(offset: runStart, length: runEnd - runStart, sha256: context?.finish() ?? ""))
        context = nil
        runStart = runEnd
    }
}
