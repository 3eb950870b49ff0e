import ArgumentParser
import QCow2

extension ZlibEncoder: ExpressibleByArgument {}

/// --zlib ENCODER (convert -c, backup -c): which deflate encoder writes zlib-type
/// compressed clusters. Without -c it is refused, as it would change nothing.
struct ZlibOption: ParsableArguments {
    @Option(name: .customLong("zlib"), help: ArgumentHelp(
        "With -c and zlib compression: igzip (default; about a quarter of the CPU time, sizes within a few per cent) or qemu (zlib level 6: qemu-img's streams byte for byte).",
        valueName: "encoder"))
    var encoder: ZlibEncoder?

    /// The encoder to use; an error naming `file` when --zlib is given without -c.
    func resolved(compress: Bool, file: String) throws -> ZlibEncoder {
        if encoder != nil && !compress { throw CommandFailure(message: "\(file): --zlib applies only with -c") }
        return encoder ?? .igzip
    }
}
