#!/usr/bin/env python3
"""Boots ferry's test guest under QEMU and checks its serial contract.

Usage: qemu_smoke.py GUEST_ELF [SCENARIO...]
Write the ELF first: cargo run -p ferry-guest --example write_elf -- guest.elf

Needs qemu-system-x86_64 and /dev/kvm. QEMU's isa-debug-exit turns the
guest's exit status n into (n << 1) | 1. Exits non-zero if a check fails.
"""

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

QEMU = os.environ.get("QEMU", "qemu-system-x86_64")
CPU = os.environ.get("QEMU_CPU", "host,-arch-capabilities")


class Vm:
    """One QEMU run: serial on a unix socket (lines collected), QMP."""

    all = []  # every Vm started, killed after each scenario

    def __init__(self, elf, append, smp=2, mem="256", extra=(), name=""):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="ferry-guest-")
        ser, qmp = os.path.join(self.dir, "ser"), os.path.join(self.dir, "qmp")
        cmd = [QEMU, "-accel", "kvm", "-cpu", CPU, "-m", str(mem), "-smp", str(smp),
               "-kernel", elf, "-append", append, "-display", "none", "-monitor", "none",
               "-chardev", f"socket,id=ser,path={ser},server=on,wait=on", "-serial", "chardev:ser",
               "-qmp", f"unix:{qmp},server=on,wait=off",
               "-device", "isa-debug-exit,iobase=0xf4,iosize=1", "-no-reboot", *extra]
        self.log = os.path.join(self.dir, "qemu.log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        Vm.all.append(self)
        self.ser = self._connect(ser)
        self.lines = []
        self.cv = threading.Condition()
        threading.Thread(target=self._reader, daemon=True).start()
        self.qmp = self._connect(qmp)
        self.qf = self.qmp.makefile("rw")
        self.qf.readline()
        self.q("qmp_capabilities")

    def _connect(self, path):
        for _ in range(600):
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                return s
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("qemu died: " + self.qemu_output())
                time.sleep(0.05)
        raise RuntimeError("cannot connect " + path)

    def _reader(self):
        buf = b""
        while True:
            data = self.ser.recv(4096)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                with self.cv:
                    self.lines.append(line.decode(errors="replace"))
                    print(f"   {self.name}|", self.lines[-1])
                    self.cv.notify_all()

    def qemu_output(self):
        return open(self.log, errors="replace").read()

    def q(self, cmd, **args):
        self.qf.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
        self.qf.flush()
        while True:
            r = json.loads(self.qf.readline())
            if "return" in r or "error" in r:
                return r

    def send(self, text):
        self.ser.sendall(text.encode())

    def wait(self, pattern, timeout=60, after=0):
        """Waits for a line matching regex `pattern` at index >= after."""
        rx = re.compile(pattern)
        end = time.time() + timeout
        with self.cv:
            while True:
                for i in range(after, len(self.lines)):
                    m = rx.match(self.lines[i])
                    if m:
                        return i, m
                left = end - time.time()
                if left <= 0 or (self.proc.poll() is not None and not self.cv.wait(0.5)):
                    raise AssertionError(f"no line matching {pattern!r}")
                self.cv.wait(min(left, 0.5))

    def exit_code(self, timeout=60):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("qemu did not exit")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def progress(m_line):
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m_line)}


def boot_checks(vm, cpus, mode):
    _, m = vm.wait(r"FERRY-GUEST boot cpus=(\d+) ram_mib=(\d+) tsc_khz=(\d+) mode=(\w+)$")
    assert int(m[1]) == cpus and m[4] == mode, m[0]
    for i in range(1, cpus):
        vm.wait(rf"CPU {i} online$")
    return int(m[3])


def s_dirty(elf, cpus):
    vm = Vm(elf, f"dirty mem=64 wss=16 rate=max passes=200 cpus={cpus}", smp=cpus)
    boot_checks(vm, cpus, "dirty")
    vm.wait(r"MARKED pages=16384 wss_pages=4096 ")
    vm.wait(r"PROGRESS seq=0 passes=\d+ gen=\d+")
    vm.wait(r"VERIFY OK pages=16384$")
    assert vm.exit_code() == 1


def s_rate(elf):
    vm = Vm(elf, "dirty mem=64 wss=4 rate=2000 cpus=2 report=500")
    khz = boot_checks(vm, 2, "dirty")
    i, first = vm.wait(r"PROGRESS seq=1 .*")
    _, last = vm.wait(r"PROGRESS seq=5 .*", after=i)
    a, b = progress(first[0]), progress(last[0])
    rate = (b["pages"] - a["pages"]) * khz * 1000 / (b["tsc"] - a["tsc"])
    print(f"   measured rate {rate:.0f} pages/s (asked 2000)")
    assert 1800 < rate < 2200, rate
    vm.send("exit 7\n")
    vm.wait(r"EXIT status=7$")
    assert vm.exit_code() == 15


def s_commands(elf):
    vm = Vm(elf, "idle cpus=2 report=300")
    boot_checks(vm, 2, "idle")
    i, _ = vm.wait(r"PROGRESS seq=1 ")
    vm.send("status\n")
    i, _ = vm.wait(r"PROGRESS seq=2 ", timeout=5, after=i)
    vm.send("verify\r")
    vm.wait(r"VERIFY OK pages=0$", timeout=5, after=i)
    vm.send("bogus\n")
    vm.wait(r"ERROR unknown command bogus$", timeout=5, after=i)
    vm.send("exit 3\n")
    vm.wait(r"EXIT status=3$", after=i)
    assert vm.exit_code() == 7


def s_verify_memory_cad(elf):
    vm = Vm(elf, "dirty mem=64 wss=16 rate=max cpus=2 verify")
    boot_checks(vm, 2, "dirty")
    i, m = vm.wait(r"MARKED pages=(\d+) wss_pages=(\d+) first_pfn=0x([0-9a-f]+) ")
    pages, wss, first = int(m[1]), int(m[2]), int(m[3], 16)
    vm.wait(r"VERIFY OK pages=16384$", after=i)
    i, _ = vm.wait(r"PROGRESS seq=1 .*passes=([1-9]\d*) ", after=i)
    vm.send("verify\n")
    i, _ = vm.wait(r"VERIFY OK pages=16384$", timeout=10, after=i)
    # Look at guest memory from outside while the guest is stopped.
    dump = os.path.join(vm.dir, "mem")
    assert "return" in vm.q("stop")
    assert "return" in vm.q("pmemsave", val=first << 12, size=pages << 12, filename=dump)
    data = open(dump, "rb").read()
    gens = []
    for k in range(pages):
        (w,) = struct.unpack_from("<Q", data, k << 12)
        assert w & 0xFFFFFFFF == first + k, (k, hex(w))
        gens.append(w >> 32)
    assert all(g == 0 for g in gens[wss:]), "non-wss pages must hold generation 0"
    assert all(g >= 1 for g in gens[:wss]), "wss pages were rewritten"
    print(f"   memory: {pages} pages ok, wss generations {min(gens[:wss])}..{max(gens[:wss])}")
    assert "return" in vm.q("cont")
    keys = [{"type": "qcode", "data": k} for k in ("ctrl", "alt", "delete")]
    assert "return" in vm.q("send-key", keys=keys)
    vm.wait(r"SHUTDOWN ctrl-alt-del$", after=i)
    vm.wait(r"VERIFY OK pages=16384$", after=i)
    assert vm.exit_code() == 1


def s_exit_and_errors(elf):
    vm = Vm(elf, "dirty exit=5", smp=1)
    vm.wait(r"EXIT status=5$")
    assert vm.exit_code() == 11
    vm = Vm(elf, "dirty foo=1", smp=1)
    vm.wait(r"ERROR unknown arg foo=1$")
    assert vm.exit_code() == 5


def s_crash(elf):
    vm = Vm(elf, "crash=triple cpus=2")
    vm.wait(r"CRASH triple$")
    assert vm.exit_code() == 0  # -no-reboot: a triple fault ends QEMU
    vm = Vm(elf, "crash=mmio-exec", smp=1)
    vm.wait(r"CRASH mmio-exec$")
    # KVM returns KVM_EXIT_INTERNAL_ERROR (emulation failure). QEMU only
    # stops on that below CPL 3; at CPL 3 it logs it and re-enters.
    for _ in range(100):
        if "emulation failure" in vm.qemu_output():
            break
        time.sleep(0.1)
    vm.kill()
    assert "emulation failure" in vm.qemu_output()


def s_migrate(elf):
    """Loopback live migration: counters continue, memory verifies."""
    args = "dirty mem=64 wss=16 rate=20000 cpus=2 report=200"
    src = Vm(elf, args, name="src")
    dst = Vm(elf, args, extra=("-incoming", "defer"), name="dst")
    boot_checks(src, 2, "dirty")
    _, m = src.wait(r"PROGRESS seq=3 ")
    port = 44000 + os.getpid() % 1000
    assert "return" in dst.q("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    src.q("migrate-set-parameters", **{"downtime-limit": 300})
    assert "return" in src.q("migrate", uri=f"tcp:127.0.0.1:{port}")
    for _ in range(600):
        st = src.q("query-migrate")["return"]
        if st.get("status") in ("completed", "failed"):
            break
        time.sleep(0.1)
    print(f"   migration {st.get('status')}: total {st.get('total-time')} ms, downtime {st.get('downtime')} ms")
    assert st["status"] == "completed", st
    last = max(progress(l)["seq"] for l in src.lines if l.startswith("PROGRESS"))
    _, m = dst.wait(r"PROGRESS seq=(\d+) ", timeout=30)
    assert int(m[1]) == last + 1, (last, m[0])
    dst.send("verify\n")
    dst.wait(r"VERIFY OK pages=16384$", timeout=30)
    dst.send("exit 0\n")
    assert dst.exit_code() == 1


SCENARIOS = {
    "dirty1": lambda e: s_dirty(e, 1),
    "dirty2": lambda e: s_dirty(e, 2),
    "rate": s_rate,
    "commands": s_commands,
    "memory": s_verify_memory_cad,
    "exit": s_exit_and_errors,
    "crash": s_crash,
    "migrate": s_migrate,
}


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    elf, names = sys.argv[1], sys.argv[2:] or list(SCENARIOS)
    failed = []
    for name in names:
        print(f"== {name}")
        t0 = time.time()
        try:
            SCENARIOS[name](elf)
            print(f"   ok ({time.time() - t0:.1f}s)")
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"   FAILED: {e!r}")
            failed.append(name)
        finally:
            for vm in Vm.all:
                vm.kill()
                shutil.rmtree(vm.dir, ignore_errors=True)
            Vm.all.clear()
    print("failed:", " ".join(failed) if failed else "none")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
