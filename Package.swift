// swift-tools-version: 6.0
import PackageDescription

/// Fault injection (Sources/QCow2/IO/FaultInjection.swift, QIMG_FAULTS) is a testing aid:
/// compiled into debug builds (the tests') only, never into a release build.
let faultInjection: SwiftSetting = .define("QIMG_FAULT_INJECTION", .when(configuration: .debug))

let package = Package(
    name: "qimg",
    products: [
        .library(name: "QCow2", targets: ["QCow2"]),
        .executable(name: "qimg", targets: ["qimg"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    ],
    targets: [
        .systemLibrary(name: "CZlib", path: "Sources/CZlib", pkgConfig: "zlib",
                       providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CZstd", path: "Sources/CZstd", pkgConfig: "libzstd",
                       providers: [.apt(["libzstd-dev"])]),
        // ISA-L's igzip header only (raw deflate for zlib-type compressed clusters, 4 KiB
        // window): libisal.so.2 is loaded with dlopen when a copy compresses.
        .systemLibrary(name: "CIsal", path: "Sources/CIsal", providers: [.apt(["libisal-dev"])]),
        .systemLibrary(name: "CLinux", path: "Sources/CLinux"),
        // libnbd's header only (no pkgConfig: nothing is linked; the library is loaded
        // with dlopen when an NBD source is used).
        .systemLibrary(name: "CNBD", path: "Sources/CNBD", providers: [.apt(["libnbd-dev"])]),
        .target(name: "QCow2", dependencies: ["CZlib", "CZstd", "CIsal", "CLinux", "CNBD"], swiftSettings: [faultInjection]),
        .executableTarget(name: "qimg", dependencies: [
            "QCow2",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ], swiftSettings: [faultInjection]),
        // Helpers shared by the test targets (process launchers, fixtures, qemu-img oracles). A
        // test target itself: built with the tests only (every `swift build` builds a regular
        // target, the static release build too, which has no Testing module).
        .testTarget(name: "TestSupport", path: "Tests/Support"),
        .testTarget(name: "QCow2Tests", dependencies: ["QCow2", "CZlib", "TestSupport"], swiftSettings: [faultInjection]),
        .testTarget(name: "qimgTests", dependencies: ["QCow2", "TestSupport"]),
    ],
    swiftLanguageModes: [.v6]
)
