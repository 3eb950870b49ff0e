import CIsal

/// The two igzip functions `ClusterCompressor` uses, looked up in ISA-L's libisal once per
/// process. It is loaded on first use (`dlopen`), not linked, like libcrypto and libnbd:
/// only compressing copies need it, and every other command would pay for loading it at
/// start-up. Debian's `libisal2` provides it.
struct LibIsal: @unchecked Sendable {
    typealias StatelessInit = @convention(c) (UnsafeMutablePointer<isal_zstream>?) -> Void
    typealias Stateless = @convention(c) (UnsafeMutablePointer<isal_zstream>?) -> Int32

    let statelessInit: StatelessInit
    let stateless: Stateless

    /// Loaded once; the error (libisal missing) is kept and thrown at each use.
    static let shared: Result<LibIsal, QCow2Error> = Result { try load() }.mapError {
        $0 as? QCow2Error ?? .unsupported(path: "libisal", detail: "\($0)")
    }

    private static func load() throws -> LibIsal {
        let lib = try DynamicLibrary(["libisal.so.2", "libisal.so"],
                                     missing: "ISA-L's libisal is needed for igzip-encoded compressed clusters and was not found (Debian: libisal2); the zlib (qemu) encoder does not need it")
        return LibIsal(statelessInit: try lib.function("isal_deflate_stateless_init", as: StatelessInit.self),
                       stateless: try lib.function("isal_deflate_stateless", as: Stateless.self, hint: "ISA-L 2.26 or later"))
    }
}
