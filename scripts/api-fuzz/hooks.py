"""schemathesis hooks for scripts/api-fuzz.sh (loaded through SCHEMATHESIS_HOOKS).

Adds the check `snapshot_files`, for PUT /vm/snapshot with a path in the run
directory (FERRY_FUZZ_RUNDIR):
- a 200 means a whole image: `ferry image verify PATH` (FERRY_FUZZ_FERRY)
  passes right after the answer, with its parents;
- any other answer leaves the file that was at PATH as it was (docs/api.md:
  "A failed snapshot leaves any previous file at `path` untouched").
"""

import os
import subprocess
import threading

import schemathesis

FERRY = os.environ.get("FERRY_FUZZ_FERRY", "ferry")
RUNDIR = os.environ.get("FERRY_FUZZ_RUNDIR", "/nonexistent")

_lock = threading.Lock()
_before = {}


def _target(case):
    if case.method.upper() != "PUT" or case.operation.path != "/vm/snapshot":
        return None
    body = case.body
    if not isinstance(body, dict):
        return None
    p = body.get("path")
    if isinstance(p, str) and "\0" not in p and os.path.normpath(p).startswith(RUNDIR + "/"):
        return p
    return None


def _stat(p):
    try:
        st = os.lstat(p)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@schemathesis.hook
def before_call(context, case, kwargs):
    p = _target(case)
    if p is not None:
        with _lock:
            _before[id(case)] = (p, _stat(p))


@schemathesis.check
def snapshot_files(ctx, response, case):
    with _lock:
        rec = _before.pop(id(case), None)
    if rec is None:
        return None
    path, before = rec
    if response.status_code == 200:
        cmd = [FERRY, "image", "verify", path]
        key = case.body.get("key_file")
        if isinstance(key, str) and key:
            cmd += ["--key-file", key]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`ferry image verify {path}` did not finish in 60 s")
        if r.returncode != 0:
            msg = (r.stderr.strip() or r.stdout.strip()).splitlines()
            raise AssertionError(
                f"Snapshot answered 200 but the image does not verify: "
                f"`ferry image verify {path}`: {msg[-1] if msg else 'exit ' + str(r.returncode)}"
            )
    elif before is not None and _stat(path) != before:
        raise AssertionError(
            f"Failed snapshot (status {response.status_code}) changed the file at {path} "
            f"(inode, size, mtime before {before}, after {_stat(path)})"
        )
    return None
