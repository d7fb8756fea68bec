#!/usr/bin/env python3
"""Density (issue #14): how many idle sandboxes one node holds, and what each costs the host.

    bench/density.py --host http://127.0.0.1:PORT --token TOKEN --image REF --home HEARTH_HOME
                     [--count 100] [--memory 512m]

Creates COUNT sandboxes of IMAGE with MEMORY each (one after another, like a steady trickle of
agents), lets them settle, then measures the host's cost per idle sandbox three ways: the drop of
MemAvailable (everything the host lost: guest pages, QEMU, page cache of the template copies), the
sum of the VMM processes' PSS (shared template pages split between the VMs that map them) and, for
reference, their RSS (shared pages counted once per VM). Then every sandbox answers one `exec
true`, timed. Prints a Markdown table and deletes the sandboxes.

With --on-idle-pause the sandboxes are created with `on_idle: pause` (and an idle timeout longer
than the run) and, after the measures above, their idle timeout is cut to one second (PATCH): the
second table is the same node with every sandbox paused by its idle timeout (MemAvailable drop, VMMs
left, snapshot blocks on disk), then one `exec true` on each, which wakes it (resume + exec), and
the MemAvailable drop once all are running again.
"""

import argparse
import json
import os
import sys
import time
from hearth_api import Api, percentile

MIB = 1 << 20


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no MemAvailable in /proc/meminfo")


def vmm_pids(home):
    """The QEMU processes whose command line names this daemon's home."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-system-x86_64") and any(home.encode() in a for a in argv):
            pids.append(int(entry))
    return pids


def mapping_pss(pid):
    """(guest memory, TCG translation cache, heap) PSS in bytes of one VMM: the sealed template copy
    it maps privately, QEMU's code buffer (its only anonymous mapping that is writable and
    executable), and its C heap (`[heap]` and the anonymous read-write mappings malloc's arenas and
    thread stacks live in)."""
    sizes = {"guest": 0, "tcg": 0, "heap": 0}
    kind = None
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                    if len(fields) > 5 and "hearth-template-memory" in fields[5]:
                        kind = "guest"
                    elif len(fields) == 5 and fields[1] == "rwxp":
                        kind = "tcg"
                    elif fields[1] == "rw-p" and (len(fields) == 5 or fields[5] == "[heap]"):
                        kind = "heap"
                    else:
                        kind = None
                elif kind and line.startswith("Pss:"):
                    sizes[kind] += int(fields[1]) * 1024
    except OSError:
        pass
    return sizes["guest"], sizes["tcg"], sizes["heap"]


def disk_blocks(path):
    """Bytes allocated on disk under `path` (sparse files count what they hold), each file once:
    every paused sandbox links its boot template's memory file (`memory.base`), which lives in
    `templates/` anyway and is not counted."""
    total = 0
    seen = set()
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if name == "memory.base" or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def exec_each(api, ids):
    """`exec true` on each sandbox in turn; the times in ms."""
    times = []
    for sid in ids:
        start = time.perf_counter()
        api.call("POST", f"/v1/sandboxes/{sid}/exec", {"argv": ["true"]})
        times.append((time.perf_counter() - start) * 1000)
    return times


def sleep_and_wake(api, args, ids, base_available):
    """The --on-idle-pause half: all paused by their idle timeout, then each woken by an exec."""
    started = time.monotonic()
    for sid in ids:
        api.call("PATCH", f"/v1/sandboxes/{sid}", {"idle_timeout_seconds": 1})
    while True:
        listed = json.loads(api.call("GET", "/v1/sandboxes"))["sandboxes"]
        paused = [s for s in listed if s["state"] == "paused" and s.get("reason") == "idle"]
        if len(paused) == len(ids):
            break
        if time.monotonic() - started > 900:
            sys.exit(f"only {len(paused)} of {len(ids)} paused after 900 s")
        time.sleep(0.5)
    all_paused = time.monotonic() - started
    time.sleep(args.settle)
    drop = (base_available - mem_available()) / len(ids)
    vmms = len(vmm_pids(args.home))
    disk = disk_blocks(os.path.join(args.home, "node", "paused")) / len(ids)
    # A long idle timeout again (a PATCH does not wake a paused sandbox), so the woken stay up.
    for sid in ids:
        api.call("PATCH", f"/v1/sandboxes/{sid}", {"idle_timeout_seconds": 24 * 3600})
    times = exec_each(api, ids)
    time.sleep(args.settle)
    woken_drop = (base_available - mem_available()) / len(ids)
    pids = vmm_pids(args.home)
    woken_pss = sum(rollup(pid)[0] for pid in pids) / max(1, len(pids))
    over = sum(1 for t in times if t > 1000)
    print()
    print(f"| measure ({len(ids)} sandboxes of {args.memory}, `on_idle: pause`) | value |")
    print("|---|---|")
    print(f"| all paused by the idle timeout (PATCH to 1 s) within | {all_paused:.1f} s |")
    print(f"| VMMs left running | {vmms} |")
    print(f"| host MemAvailable drop per sandbox, all paused (from before the first) | "
          f"{drop / MIB:.1f} MiB |")
    print(f"| snapshot on disk per sandbox (allocated blocks) | {disk / MIB:.1f} MiB |")
    print(f"| `exec true` on each, which wakes it: p50 / p99 / max | {percentile(times, 50):.0f} / "
          f"{percentile(times, 99):.0f} / {max(times):.0f} ms |")
    print(f"| sandboxes whose waking exec took over 1 s | {over} of {len(times)} |")
    print(f"| host MemAvailable drop per sandbox, all woken (from before the first) | "
          f"{woken_drop / MIB:.1f} MiB |")
    print(f"| VMM PSS per woken sandbox | {woken_pss / MIB:.1f} MiB |")


def rollup(pid):
    """(Pss, Rss) in bytes from /proc/PID/smaps_rollup."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, rss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--home", required=True, help="the daemon's HEARTH_HOME (finds its VMMs)")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--memory", default="512m")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds idle before measuring")
    parser.add_argument("--on-idle-pause", action="store_true",
                        help="then pause them all by their idle timeout and wake each with an exec")
    args = parser.parse_args()
    api = Api(args.host, args.token)
    create = {"image": args.image, "memory": args.memory}
    if args.on_idle_pause:
        create.update({"idle_timeout_seconds": 24 * 3600, "on_idle": "pause"})

    # One sandbox first, so the template and its image are built before the baseline is read;
    # the --on-idle-pause half counts from before it (then no sandbox runs).
    before_first = mem_available()
    ids = [json.loads(api.call("POST", "/v1/sandboxes", create, expect=201))["id"]]
    time.sleep(args.settle)
    base_available = mem_available()
    created = time.monotonic()
    try:
        for i in range(1, args.count):
            ids.append(json.loads(api.call("POST", "/v1/sandboxes", create, expect=201))["id"])
            if i % 10 == 0:
                print(f"  {i + 1} sandboxes, {time.monotonic() - created:.0f} s", file=sys.stderr)
        time.sleep(args.settle)
        added = args.count - 1
        drop = (base_available - mem_available()) / added
        pids = vmm_pids(args.home)
        sums = [rollup(pid) for pid in pids]
        pss = sum(s[0] for s in sums) / len(pids)
        rss = sum(s[1] for s in sums) / len(pids)
        parts = [mapping_pss(pid) for pid in pids]
        guest = sum(p[0] for p in parts) / len(pids)
        tcg = sum(p[1] for p in parts) / len(pids)
        heap = sum(p[2] for p in parts) / len(pids)
        times = exec_each(api, ids)
        over = sum(1 for t in times if t > 1000)
        print(f"| measure ({args.count} idle sandboxes of {args.memory}, {len(pids)} VMMs) | value |")
        print("|---|---|")
        print(f"| host MemAvailable drop per added sandbox | {drop / MIB:.1f} MiB |")
        print(f"| VMM PSS per sandbox (shared pages split) | {pss / MIB:.1f} MiB |")
        print(f"| of which guest memory (template pages shared, written pages private) | "
              f"{guest / MIB:.1f} MiB |")
        print(f"| of which TCG's translation cache (translated guest code; none under KVM) | "
              f"{tcg / MIB:.1f} MiB |")
        print(f"| of which QEMU's heap (malloc arenas, thread stacks) | {heap / MIB:.1f} MiB |")
        print(f"| VMM RSS per sandbox (shared pages counted in each) | {rss / MIB:.1f} MiB |")
        print(f"| guest memory per sandbox (what a private copy could reach) | "
              f"{int(args.memory.rstrip('mM'))} MiB |")
        print(f"| `exec true` on each, p50 / p99 / max | {percentile(times, 50):.0f} / "
              f"{percentile(times, 99):.0f} / {max(times):.0f} ms |")
        print(f"| sandboxes whose exec took over 1 s | {over} of {len(times)} |")
        if args.on_idle_pause:
            sleep_and_wake(api, args, ids, before_first)
    finally:
        for sid in ids:
            api.call("DELETE", f"/v1/sandboxes/{sid}", expect=204)


if __name__ == "__main__":
    main()
