import CZlib
import Foundation
import Testing
@testable import QCow2

/// The zlib-type streams qimg writes must inflate with QEMU's 4 KiB window (windowBits
/// -12): a match reaching further back is an error there. The input repeats 8 KiB blocks,
/// which an encoder with a larger window would copy from 8 KiB back.
@Suite struct ClusterCompressorTests {
    static let clusterSize = 65536

    /// 8 KiB of seeded random bytes, eight times over: compressible only by matches 8 KiB back
    /// (which a 4 KiB window cannot see) or by the literal statistics of the bytes (hex text).
    static func farRepeats() -> [UInt8] {
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        let hex = Array("0123456789abcdef".utf8)
        let block = (0..<8192).map { _ -> UInt8 in
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return hex[Int(state >> 60)]
        }
        return Array(repeating: block, count: clusterSize / 8192).flatMap { $0 }
    }

    /// Inflates a raw deflate stream with windowBits `bits`, 1 KiB of output per call so
    /// that every match must come from the window (in one call with the whole output, zlib
    /// also takes matches from the output buffer, whatever the window). Nil when zlib
    /// refuses the stream (a match further back than the window: "invalid distance too far back").
    static func inflate(_ stream: [UInt8], windowBits bits: Int32, count: Int) -> [UInt8]? {
        var strm = z_stream()
        guard inflateInit2_(&strm, -bits, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return nil }
        defer { inflateEnd(&strm) }
        var out = [UInt8](repeating: 0, count: count)
        var input = stream
        var r = Z_OK
        input.withUnsafeMutableBufferPointer { i in
            strm.next_in = i.baseAddress
            strm.avail_in = uInt(i.count)
            out.withUnsafeMutableBufferPointer { o in
                var done = 0
                while r == Z_OK && done < o.count {
                    let step = min(1024, o.count - done)
                    strm.next_out = o.baseAddress! + done
                    strm.avail_out = uInt(step)
                    r = CZlib.inflate(&strm, Z_NO_FLUSH)
                    done += step - Int(strm.avail_out)
                }
                if r == Z_OK { r = CZlib.inflate(&strm, Z_FINISH) }
            }
        }
        return r == Z_STREAM_END && Int(strm.total_out) == count ? out : nil
    }

    static func compress(_ data: [UInt8], _ encoder: ZlibEncoder) throws -> [UInt8] {
        let c = try #require(ClusterCompressor(.zlib, encoder: encoder, clusterSize: clusterSize))
        var out = [UInt8](repeating: 0, count: c.outputCapacity)
        let n = try #require(data.withUnsafeBytes { i in out.withUnsafeMutableBytes { c.compress(i, into: $0) } })
        return Array(out[0..<n])
    }

    @Test(arguments: ZlibEncoder.allCases)
    func streamsInflateWithQEMUsWindow(_ encoder: ZlibEncoder) throws {
        let data = Self.farRepeats()
        let stream = try Self.compress(data, encoder)
        #expect(stream.count < data.count)
        let read = Self.inflate(stream, windowBits: 12, count: data.count) == data
        #expect(read, "\(encoder): not readable with a 4 KiB window")
    }

    /// The check above can fail: a 32 KiB-window stream of the same data is refused by a
    /// 4 KiB-window inflate (and read by a 32 KiB one).
    @Test func aWiderWindowIsRefusedByQEMUsInflate() throws {
        let data = Self.farRepeats()
        var wide = [UInt8](repeating: 0, count: data.count)
        var n = uLongf(wide.count)
        var strm = z_stream()
        #expect(deflateInit2_(&strm, 6, Z_DEFLATED, -15, 9, Z_DEFAULT_STRATEGY, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK)
        var input = data
        let r = input.withUnsafeMutableBufferPointer { i in
            wide.withUnsafeMutableBufferPointer { o in
                strm.next_in = i.baseAddress
                strm.avail_in = uInt(i.count)
                strm.next_out = o.baseAddress
                strm.avail_out = uInt(o.count)
                return deflate(&strm, Z_FINISH)
            }
        }
        n = uLongf(wide.count) - uLongf(strm.avail_out)
        deflateEnd(&strm)
        #expect(r == Z_STREAM_END)
        let stream = Array(wide[0..<Int(n)])
        let wideRead = Self.inflate(stream, windowBits: 15, count: data.count) == data
        let narrowRefused = Self.inflate(stream, windowBits: 12, count: data.count) == nil
        #expect(wideRead)
        #expect(narrowRefused)
    }

    /// A cluster that does not compress is reported as such by both encoders (stored as it is).
    @Test(arguments: ZlibEncoder.allCases)
    func incompressibleClustersAreNotStreams(_ encoder: ZlibEncoder) throws {
        var state: UInt64 = 1
        let data = (0..<Self.clusterSize).map { _ -> UInt8 in
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return UInt8(truncatingIfNeeded: state >> 56)
        }
        let c = try #require(ClusterCompressor(.zlib, encoder: encoder, clusterSize: Self.clusterSize))
        var out = [UInt8](repeating: 0, count: c.outputCapacity)
        #expect(data.withUnsafeBytes { i in out.withUnsafeMutableBytes { c.compress(i, into: $0) } } == nil)
    }
}
