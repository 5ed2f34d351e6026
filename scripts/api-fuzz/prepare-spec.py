#!/usr/bin/env python3
"""Prepares the extracted OpenAPI spec for scripts/api-fuzz.sh.

Usage: prepare-spec.py SPEC.yaml BASE_URL RUNDIR

Rewrites SPEC.yaml (the copy extracted from docs/api.md, never docs/api.md
itself) with:
- a `servers` entry for BASE_URL;
- request examples for PUT /vm/snapshot. A fuzzer almost never invents an
  absolute path that exists, so without them no snapshot would succeed and
  the file checks of docs/api.md ("Files") would go untested. The examples
  name files in RUNDIR (the only writable directory of the VM's mount
  namespace; api-fuzz.sh creates the key files, FIFO, symlink) and paths the
  API must refuse with 400. Nothing here aims at a host file: everything
  outside RUNDIR is read-only for ferry, and the one write outside it
  (/ferry-fuzz-probe.img) only checks that a read-only place is refused.
"""

import sys

import yaml


def main():
    path, url, run = sys.argv[1:]
    spec = yaml.safe_load(open(path))
    spec["servers"] = [{"url": url}]

    # In the order they should run: base, then an incremental over it, then
    # one over that written onto its own parent; then the refusals.
    examples = {
        "full": {"path": f"{run}/base.img"},
        "incremental": {"path": f"{run}/incr.img", "parent": f"{run}/base.img"},
        "parent_is_path": {"path": f"{run}/incr.img", "parent": f"{run}/incr.img"},
        "encrypted_zstd_paused": {
            "path": f"{run}/enc.img",
            "key_file": f"{run}/key",
            "codec": "zstd",
            "zstd_level": 1,
            "digest": True,
            "mode": "pause",
            "final_phase": "copy",
        },
        "uncompressed_live_copy": {
            "path": f"{run}/raw.img",
            "codec": "none",
            "downtime_ms": 0,
            "max_rounds": 1,
            "final_phase": "copy",
        },
        "read_only_place": {"path": "/ferry-fuzz-probe.img"},
        "directory": {"path": run},
        "missing_directory": {"path": f"{run}/missing/x.img"},
        "fifo": {"path": f"{run}/fifo"},
        "symlink": {"path": f"{run}/link"},
        "socket": {"path": f"{run}/api.sock"},
        "device": {"path": "/dev/null"},
        "procfs": {"path": "/proc/self/x.img"},
        "sysfs": {"path": "/sys/x.img"},
        "relative": {"path": "x.img"},
        "nul_byte": {"path": f"{run}/a\u0000b.img"},
        "key_file_too_big": {"path": f"{run}/x.img", "key_file": f"{run}/bigkey"},
        "key_file_directory": {"path": f"{run}/x.img", "key_file": run},
        "key_file_device": {"path": f"{run}/x.img", "key_file": "/dev/zero"},
        "key_file_missing": {"path": f"{run}/x.img", "key_file": f"{run}/nokey"},
        "parent_not_an_image": {"path": f"{run}/x.img", "parent": f"{run}/key"},
        "parent_missing": {"path": f"{run}/x.img", "parent": f"{run}/missing.img"},
    }
    media = spec["paths"]["/vm/snapshot"]["put"]["requestBody"]["content"]["application/json"]
    media.pop("example", None)
    # schemathesis 4.32 runs a media type's examples last to first.
    media["examples"] = {k: {"value": v} for k, v in reversed(examples.items())}
    # Property examples: the base the coverage phase varies one field at a time.
    props = spec["paths"]["/vm/snapshot"]["put"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    props["path"]["example"] = f"{run}/cov.img"
    props["key_file"]["example"] = f"{run}/key"

    console = spec["paths"]["/vm/console"]["put"]["requestBody"]["content"]["application/json"]
    console.setdefault("examples", {
        "command": {"value": {"input": "verify\n"}},
        "empty": {"value": {"input": ""}},
        "large": {"value": {"input": "x" * 65536}},
    })

    shutdown = spec["paths"]["/vm/shutdown"]["put"]["requestBody"]["content"]["application/json"]
    shutdown.setdefault("examples", {
        "now": {"value": {"timeout_ms": 0}},
        "default": {"value": {}},
    })

    yaml.safe_dump(spec, open(path, "w"), sort_keys=False, allow_unicode=False)


if __name__ == "__main__":
    main()
