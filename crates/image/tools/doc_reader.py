# Independent reader written only from docs/image-format.md (codec none, no
# encryption): rebuilds guest memory and compares it with the raw export.
#   FERRY_DOC_CHECK_DIR=/tmp/x cargo test -p ferry-image write_doc_check_sample
#   python3 crates/image/tools/doc_reader.py /tmp/x
import json, struct, sys
d = sys.argv[1]
b = open(d + "/sample.img", "rb").read()
assert b[0:8] == b"FERRYIMG"
ver, flags, hlen = struct.unpack_from("<IIQ", b, 8)
assert ver == 1 and flags == 0
hdr = json.loads(b[56:56 + hlen])
data_start = 56 + hlen
t = len(b) - 64
assert b[t:t + 8] == b"FERRYEND"
tver, tres, foff, flen = struct.unpack_from("<IIQQ", b, t + 8)
assert foff + flen == t
f = b[foff:foff + flen]
assert f[0:4] == b"FFTR"
nchunks, so, sl, co, cl = struct.unpack_from("<QQQQQ", f, 8)
assert f[48:80] == b[24:56], "footer header_hash == preamble header_hash"
assert b[so:so + 4] == b"FSTA" and b[co:co + 4] == b"FCPU"
assert f[80:112] == b[so + sl - 32:so + sl]
at = 208
mem = bytearray(0x300000)
for i in range(nchunks):
    off, rlen = struct.unpack_from("<QQ", f, at)
    h = f[at + 16:at + 48]
    nruns, dpages = struct.unpack_from("<II", f, at + 48)
    runs_f = f[at + 56:at + 56 + 16 * nruns]
    at += 56 + 16 * nruns
    r = b[off:off + rlen]
    assert r[0:4] == b"FCHK"
    idx, nr = struct.unpack_from("<II", r, 4)
    codec, fl = r[12], r[13]
    raw_len, stored = struct.unpack_from("<II", r, 16)
    assert idx == i and nr == nruns and codec == 0 and fl == 0 and raw_len == dpages * 4096
    assert r[24:24 + 16 * nr] == runs_f
    assert r[-32:] == h and 24 + 16 * nr + stored + 32 == rlen
    payload = r[24 + 16 * nr:24 + 16 * nr + stored]
    p = 0
    for k in range(nr):
        gpa, n, kind = struct.unpack_from("<QII", r, 24 + 16 * k)
        if kind == 0:
            mem[gpa:gpa + n * 4096] = payload[p:p + n * 4096]; p += n * 4096
        else:
            mem[gpa:gpa + n * 4096] = bytes(n * 4096)
assert at == len(f)
state = b[so + 24:so + sl - 32]
assert state == b"device state bytes", state
cpus = json.loads(b[co + 24:co + cl - 32])
assert cpus[0]["cs"]["selector"] == 16 and "kernel_gs_base" in cpus[0]
assert bytes(mem) == open(d + "/sample.raw", "rb").read()
print("doc reader OK:", nchunks, "chunks, ranges", hdr["ranges"], "codec", hdr["codec"])
