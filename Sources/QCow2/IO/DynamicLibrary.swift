#if canImport(Glibc)
import Glibc
#endif

/// A C library loaded on first use (`dlopen`) rather than linked, so that commands that
/// never need it don't pay for loading it at start-up (libcrypto, libnbd).
struct DynamicLibrary {
    private let handle: UnsafeMutableRawPointer
    /// The name errors give (the first file name tried).
    let name: String

    /// Opens the first of `files` that loads; `missing` says what it is needed for and
    /// which package provides it.
    init(_ files: [String], missing: String) throws {
        name = files.first ?? ""
        guard let h = files.lazy.compactMap({ dlopen($0, RTLD_NOW | RTLD_LOCAL) }).first else {
            throw QCow2Error.unsupported(path: name, detail: missing)
        }
        handle = h
    }

    /// The function `symbol`, as the C function type `T`; `hint` ends the error when the
    /// library lacks it (e.g. the version needed).
    func function<T>(_ symbol: String, as type: T.Type, hint: String = "") throws -> T {
        guard let p = dlsym(handle, symbol) else {
            throw QCow2Error.unsupported(path: name, detail: "\(name) has no \(symbol)" + (hint.isEmpty ? "" : " (\(hint))"))
        }
        return unsafeBitCast(p, to: type)
    }
}
