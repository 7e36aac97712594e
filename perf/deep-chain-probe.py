#!/usr/bin/env python3
"""Restore of a deep incremental chain against its merged file, by hand.

Usage:
  perf/deep-chain-probe.py build DIR [MIB]    # full + 16 increments + merged
  perf/deep-chain-probe.py time DIR [REPS]    # chain, merged, alternately
  BIN=path/to/ringvm (default target/release/ringvm)

`build` boots the test guest (MIB of RAM, default 4096, 90% filled, then
rewritten at 100 MiB/s), takes `savevm-start {"track": true}` and 16
increments each against the last (1% of the RAM in use rewritten before
each), and `ringvm state merge`s the chain into DIR/merged.state. `time`
restores DIR/d-inc16.state and DIR/merged.state (`run -S --restore-ram
read --loadstate`), each dropped from the page cache first, and prints
process start to the QMP socket and to `paused`, and their ratio. Every
wait has a deadline; each ringvm is ended by its PID. The chain's files
name their bases by absolute path: a chain moved elsewhere will not load.
"""
import contextlib, json, os, socket, subprocess, sys, threading, time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = os.environ.get("BIN", os.path.join(root, "target/release/ringvm"))
DEPTH, RATE = 16, 100


def qmp(sock_path, deadline=60):
    t0 = time.monotonic()
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock_path)
            break
        except OSError:
            if time.monotonic() - t0 > deadline:
                raise SystemExit(f"no QMP socket at {sock_path}")
            time.sleep(0.0005)
    f = s.makefile("rw")
    json.loads(f.readline())

    def cmd(name, args=None):
        f.write(json.dumps({"execute": name, **({"arguments": args} if args else {})}) + "\n")
        f.flush()
        while True:
            line = f.readline()
            if not line:
                raise SystemExit(f"QMP closed during {name}")
            r = json.loads(line)
            if "return" in r or "error" in r:
                return r

    cmd("qmp_capabilities")
    return cmd


@contextlib.contextmanager
def ringvm(args, **kw):
    """`ringvm ARGS`, ended by its PID on the way out if it still runs."""
    p = subprocess.Popen([binary] + args, **kw)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(30)


def name(d, i):
    return os.path.join(d, "d-full.state" if i == 0 else f"d-inc{i}.state")


def build(d, mib):
    os.makedirs(d, exist_ok=True)
    guest = os.path.join(d, "guest.elf")
    subprocess.run([binary, "guest-image", "--out", guest], check=True)
    sock = os.path.join(d, "build.sock")
    if os.path.exists(sock):
        os.remove(sock)
    fill = mib * 9 // 10
    args = ["run", "--cpus", "1", "--memory", f"{mib}M", "--kernel", guest, "--cmdline", f"work=mem mib={fill} secs=inf rate={RATE} beat=100", "--qmp", sock]
    with ringvm(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as p:
        filled = threading.Event()

        def watch():
            for line in p.stdout:
                if "fill done" in line:
                    filled.set()

        threading.Thread(target=watch, daemon=True).start()
        if not filled.wait(600):
            raise SystemExit("the guest did not fill its memory in 600 s")
        cmd = qmp(sock)
        for i in range(DEPTH + 1):
            a = {"statefile": name(d, i), "track": True}
            if i:
                a["base"] = name(d, i - 1)
            r = cmd("savevm-start", a)
            if "error" in r:
                raise SystemExit(f"savevm-start: {r['error']}")
            t0 = time.monotonic()
            while cmd("query-savevm")["return"]["status"] != "completed":
                if time.monotonic() - t0 > 600:
                    raise SystemExit("snapshot did not complete in 600 s")
                time.sleep(0.05)
            cmd("savevm-end")
            time.sleep(fill * 0.01 / RATE)
        cmd("quit")
    subprocess.run([binary, "state", "merge", name(d, DEPTH), "--out", os.path.join(d, "merged.state")], check=True)


def uncache(d):
    for n in os.listdir(d):
        if n.endswith(".state"):
            fd = os.open(os.path.join(d, n), os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def restore(d, state):
    uncache(d)
    sock = os.path.join(d, "restore.sock")
    if os.path.exists(sock):
        os.remove(sock)
    t0 = time.monotonic()
    with ringvm(["run", "-S", "--serial", "off", "--loadstate", state, "--restore-ram", "read", "--qmp", sock], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        cmd = qmp(sock)
        at_socket = time.monotonic() - t0
        while cmd("query-status")["return"]["status"] == "inmigrate":
            if time.monotonic() - t0 > 600:
                raise SystemExit("restore did not finish in 600 s")
            time.sleep(0.001)
        done = time.monotonic() - t0
        cmd("quit")
    return done * 1e3, at_socket * 1e3


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("build", "time"):
        raise SystemExit(__doc__)
    d = os.path.abspath(sys.argv[2])
    if sys.argv[1] == "build":
        build(d, int(sys.argv[3]) if len(sys.argv) > 3 else 4096)
        return
    ratios = []
    for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 3):
        c = restore(d, name(d, DEPTH))
        m = restore(d, os.path.join(d, "merged.state"))
        ratios.append(c[0] / m[0])
        print(f"chain {c[0]:.0f} ms (socket {c[1]:.0f}), merged {m[0]:.0f} ms (socket {m[1]:.0f}), ratio {c[0] / m[0]:.3f}", flush=True)
    ratios.sort()
    print(f"median ratio {ratios[len(ratios) // 2]:.3f}")


main()
