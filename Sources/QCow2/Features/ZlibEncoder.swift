/// Which deflate encoder makes the streams of zlib-type compressed clusters. Both write
/// raw deflate with a 4 KiB window, which QEMU inflates; they differ in speed and size.
public enum ZlibEncoder: String, Sendable, CaseIterable {
    /// ISA-L's igzip at its level 3: about a quarter of zlib's CPU time; streams within a
    /// few per cent of zlib level 6's in size (smaller on text, larger on binaries).
    case igzip
    /// zlib at level 6, memLevel 9, as QEMU compresses: qemu-img's streams byte for byte.
    case qemu
}
