#if canImport(Glibc)
import Glibc
#endif

/// Early writeback for streaming writers (convert and backup targets): starting the
/// kernel's writeback of what was written so far keeps dirty pages few, so the writer
/// is not throttled in bursts and the final fsync has little left to do.
extension BlockFile {
    /// Starts (does not wait for) writeback of the file's dirty pages:
    /// sync_file_range(SYNC_FILE_RANGE_WRITE). A no-op where it is unavailable;
    /// durability still comes from `fullSync()`.
    public func startWriteback() {
        #if os(Linux)
        guard let call = SyncFileRange.function else { return }
        _ = call(fd, 0, 0, 2 /* SYNC_FILE_RANGE_WRITE */)
        #endif
    }
}

#if os(Linux)
private enum SyncFileRange {
    typealias Function = @convention(c) (Int32, Int64, Int64, UInt32) -> Int32
    /// glibc declares sync_file_range only under _GNU_SOURCE, which Swift's Glibc module
    /// does not import; it is looked up once at run time instead.
    static let function: Function? = {
        guard let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "sync_file_range") else { return nil }
        return unsafeBitCast(sym, to: Function.self)
    }()
}
#endif
