#!/usr/bin/env python3
"""Firecracker vs ferry snapshot/restore, same guest, same machine.

Usage: FC=/path/to/firecracker [N=5] scripts/bench-firecracker.py MIB [fc] [ferry]

Boots the test guest (`ferry guest export`) in each VMM with MIB of memory,
takes N snapshots (Firecracker: pause, snapshot/create, resume; ferry: live
and --pause), restores the last one N times in fresh processes (ferry: lazy
and eager), checks that every restored guest continues its sequence and
verifies all its pages, and writes result-{fc,ferry}-MIB.json into $DIR
(default /tmp/ferry-fc). docs/benchmarks.md has the method and the figures.
"""
import http.client, json, os, socket, statistics, subprocess, sys, threading, time

FC = os.environ.get("FC", "/work/target-fc/release/firecracker")
FERRY = os.environ.get(
    "FERRY", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "ferry"))
D = os.environ.get("DIR", "/tmp/ferry-fc")
CMDLINE = "dirty wss=64 rate=max report=500"
N = int(os.environ.get("N", "3"))


class UHTTP(http.client.HTTPConnection):
    def __init__(self, path, timeout=120):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def req(sock, method, path, body=None, timeout=300):
    c = UHTTP(sock, timeout)
    t0 = time.monotonic()
    data = json.dumps(body) if body is not None else None
    c.request(method, path, body=data, headers={"Content-Type": "application/json", "Accept": "application/json"})
    r = c.getresponse()
    txt = r.read().decode(errors="replace")
    dt = (time.monotonic() - t0) * 1e3
    c.close()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path} -> {r.status} {txt}")
    return dt, txt


class Proc:
    def __init__(self, args, name):
        self.name = name
        self.lines = []  # (t, line)
        self.cv = threading.Condition()
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.p.stdout:
            l = raw.decode(errors="replace").rstrip("\r\n")
            with self.cv:
                self.lines.append((time.monotonic(), l))
                self.cv.notify_all()
        with self.cv:
            self.lines.append((time.monotonic(), None))
            self.cv.notify_all()

    def wait_line(self, pred, start=0, timeout=60):
        end = time.monotonic() + timeout
        i = start
        with self.cv:
            while True:
                while i < len(self.lines):
                    t, l = self.lines[i]
                    if l is None:
                        raise RuntimeError(f"{self.name} exited: {self.tail()}")
                    if pred(l):
                        return i, t, l
                    i += 1
                left = end - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{self.name}: timeout waiting; {self.tail()}")
                self.cv.wait(left)

    def tail(self):
        return " | ".join(str(l) for _, l in self.lines[-8:])

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def wait_sock(path, timeout=10):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path):
            try:
                s = socket.socket(socket.AF_UNIX); s.connect(path); s.close(); return time.monotonic()
            except OSError:
                pass
        time.sleep(0.0005)
    raise RuntimeError("socket never appeared: " + path)


def seq_of(l):
    for w in l.split():
        if w.startswith("seq="):
            return int(w[4:])
    return None


def sizes(p):
    st = os.stat(p)
    return st.st_size, st.st_blocks * 512


def rm(*ps):
    for p in ps:
        try: os.remove(p)
        except FileNotFoundError: pass


def med(xs):
    return statistics.median(xs)


def fc_bench(mib):
    out = {"mem_mib": mib}
    sock = f"{D}/fc.sock"; rm(sock)
    vm = Proc([FC, "--api-sock", sock, "--no-seccomp", "--enable-pci"], "firecracker")
    wait_sock(sock)
    req(sock, "PUT", "/boot-source", {"kernel_image_path": f"{D}/guest.elf", "boot_args": CMDLINE})
    req(sock, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": mib})
    req(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
    i, _, l = vm.wait_line(lambda l: l.startswith("MARKED"), timeout=300)
    print("FC", l, flush=True)
    i, _, l = vm.wait_line(lambda l: l.startswith("PROGRESS"), i, timeout=60)
    snaps = []
    for k in range(N):
        snap, mem = f"{D}/snap", f"{D}/mem"
        rm(snap, mem)
        tp, _ = req(sock, "PATCH", "/vm", {"state": "Paused"})
        tc, _ = req(sock, "PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": snap, "mem_file_path": mem})
        tr, _ = req(sock, "PATCH", "/vm", {"state": "Resumed"})
        s = {"pause_ms": tp, "create_ms": tc, "resume_ms": tr, "downtime_ms": tp + tc + tr,
             "snap_size": sizes(snap), "mem_size": sizes(mem)}
        print("FC snapshot", json.dumps(s), flush=True)
        snaps.append(s)
        n = len(vm.lines)
        i, _, l = vm.wait_line(lambda l: l.startswith("PROGRESS"), n, timeout=60)
    last_seq = seq_of(vm.lines[i][1])
    vm.kill()
    out["snapshots"] = snaps
    # restores (of the last snapshot)
    rest = []
    for k in range(N):
        rsock = f"{D}/fcr.sock"; rm(rsock)
        r = Proc([FC, "--api-sock", rsock, "--no-seccomp", "--enable-pci"], "firecracker-restore")
        ts = wait_sock(rsock)
        t_req = time.monotonic()
        tl, _ = req(rsock, "PUT", "/snapshot/load", {"snapshot_path": f"{D}/snap",
                    "mem_backend": {"backend_type": "File", "backend_path": f"{D}/mem"}, "resume_vm": True})
        t_resp = time.monotonic()
        i, tpr, l1 = r.wait_line(lambda l: l.startswith("PROGRESS"), timeout=60)
        i, tpr2, l2 = r.wait_line(lambda l: l.startswith("PROGRESS"), i + 1, timeout=60)
        s1, s2 = seq_of(l1), seq_of(l2)
        x = {"sock_ready_ms": (ts - r.t0) * 1e3, "load_req_ms": tl, "start_to_load_resp_ms": (t_resp - r.t0) * 1e3,
             "start_to_first_progress_ms": (tpr - r.t0) * 1e3, "load_req_to_first_progress_ms": (tpr - t_req) * 1e3,
             "seqs": [s1, s2], "continues": s1 is not None and s2 is not None and s2 > s1 and s1 >= last_seq - 1}
        try:
            req(rsock, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
            _, tv, lv = r.wait_line(lambda l: "VERIFY" in l, i + 1, timeout=60)
            x["verify"] = lv
        except Exception as e:
            x["verify"] = "failed: " + str(e)[-300:]
        print("FC restore", json.dumps(x), flush=True)
        rest.append(x)
        r.kill()
    out["restores"] = rest
    return out


def ferry_bench(mib):
    out = {"mem_mib": mib}
    sock = f"{D}/ferry.sock"; rm(sock)
    vm = Proc([FERRY, "run", "--kernel", "builtin:test", "--mem", f"{mib}M", "--cmdline", CMDLINE, "--api-sock", sock], "ferry run")
    i, _, l = vm.wait_line(lambda l: l.startswith("MARKED"), timeout=300)
    print("ferry", l, flush=True)
    vm.wait_line(lambda l: l.startswith("PROGRESS"), i, timeout=60)
    for mode in ["live", "pause"]:
        runs = []
        for k in range(N):
            img = f"{D}/ferry-{mode}-{k}.img"; rm(img)
            args = [FERRY, "snapshot", "--api-sock", sock, "--out", img, "--json"] + (["--pause"] if mode == "pause" else [])
            t0 = time.monotonic()
            p = subprocess.run(args, capture_output=True, text=True)
            wall = (time.monotonic() - t0) * 1e3
            if p.returncode != 0:
                raise RuntimeError(f"ferry snapshot failed: {p.stderr}")
            j = json.loads(p.stdout)
            x = {"wall_ms": wall, "pause_ms": j.get("pause_ms"), "total_ms": j.get("total_ms"),
                 "bytes_written": j.get("bytes_written"), "file": sizes(img), "img": img}
            print("ferry snapshot", mode, json.dumps(x), flush=True)
            runs.append(x)
            n = len(vm.lines)
            vm.wait_line(lambda l: l.startswith("PROGRESS"), n, timeout=60)
        out[mode] = runs
        out[mode + "_raw_last"] = j
    try:
        req(sock, "PUT", "/vm/shutdown", {"timeout_ms": 20000})
        vm.p.wait(60)
    except Exception as e:
        print("ferry shutdown:", e)
    vm.kill()
    img = out["pause"][-1]["img"]
    for memmode in ["lazy", "eager"]:
        rest = []
        for k in range(N):
            rsock, rep = f"{D}/ferryr.sock", f"{D}/ferry-restore.json"; rm(rsock, rep)
            r = Proc([FERRY, "restore", img, "--memory", memmode, "--serial", "stdio", "--api-sock", rsock, "--report", rep], "ferry restore")
            i, tpr, l1 = r.wait_line(lambda l: l.startswith("PROGRESS"), timeout=60)
            i, _, l2 = r.wait_line(lambda l: l.startswith("PROGRESS"), i + 1, timeout=60)
            req(rsock, "PUT", "/vm/shutdown", {"timeout_ms": 20000})
            r.p.wait(60)
            ok = any(l and "VERIFY OK" in l for _, l in r.lines)
            with open(rep) as f:
                rj = json.load(f)["restore"]
            x = {"ready_ms": rj.get("ready_ms"), "first_instruction_ms": rj.get("first_instruction_ms"),
                 "start_to_first_progress_ms": (tpr - r.t0) * 1e3, "seqs": [seq_of(l1), seq_of(l2)], "verified": ok}
            print("ferry restore", memmode, json.dumps(x), flush=True)
            rest.append(x)
            r.kill()
        out["restore_" + memmode] = rest
    return out


if __name__ == "__main__":
    mib = int(sys.argv[1])
    os.makedirs(D, exist_ok=True)
    if not os.path.exists(f"{D}/guest.elf"):
        subprocess.run([FERRY, "guest", "export", "--out", f"{D}/guest.elf"], check=True)
    which = sys.argv[2:] or ["fc", "ferry"]
    res = {}
    if "fc" in which:
        res["fc"] = fc_bench(mib)
    if "ferry" in which:
        res["ferry"] = ferry_bench(mib)
    for k in which:
        with open(f"{D}/result-{k}-{mib}.json", "w") as f:
            json.dump(res[k], f, indent=1)
