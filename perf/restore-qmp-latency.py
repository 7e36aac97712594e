#!/usr/bin/env python3
"""QMP round trips while ringvm restores a state file.

Usage: perf/restore-qmp-latency.py STATE [WRAPPER...]
  BIN=path/to/ringvm (default target/release/ringvm)

Drops the page cache, starts `ringvm run -S --loadstate STATE`, sends
`query-status` every millisecond until the status leaves `inmigrate`, then
quits the VM and prints the count, p50, p99, the worst round trip and the
trips over 2 ms (seconds since start, ms). Needs root (drop_caches).
"""
import json, os, socket, subprocess, sys, tempfile, time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
state, wrapper = sys.argv[1], sys.argv[2:]
binary = os.environ.get("BIN", os.path.join(root, "target/release/ringvm"))
sock = os.path.join(tempfile.mkdtemp(prefix="ringvm-lat-"), "qmp.sock")
subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
t0 = time.time()
p = subprocess.Popen(wrapper + [binary, "run", "-S", "--serial", "off", "--loadstate", state, "--qmp", sock], stdout=subprocess.DEVNULL)
try:
    deadline = time.time() + 30
    while True:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            break
        except OSError:
            if time.time() > deadline or p.poll() is not None:
                sys.exit("ringvm did not open its QMP socket")
            time.sleep(0.002)
    f = s.makefile("rwb")
    f.readline()
    f.write(b'{"execute":"qmp_capabilities"}\n'); f.flush(); f.readline()
    lat, big = [], []
    while True:
        t = time.perf_counter()
        f.write(b'{"execute":"query-status"}\n'); f.flush()
        while True:
            line = f.readline()
            if not line:
                sys.exit("ringvm closed the connection")
            reply = json.loads(line)
            if "return" in reply:
                break
        d = (time.perf_counter() - t) * 1e3
        lat.append(d)
        if d > 2:
            big.append((round(time.time() - t0, 3), round(d, 2)))
        if reply["return"]["status"] != "inmigrate":
            break
        if time.time() - t0 > 600:
            sys.exit("restore did not finish in 600 s")
        time.sleep(0.001)
    elapsed = time.time() - t0
    f.write(b'{"execute":"quit"}\n'); f.flush()
    p.wait(timeout=30)
finally:
    if p.poll() is None:
        p.kill()
        p.wait()
lat.sort()
print(f"n={len(lat)} time={elapsed:.2f}s p50={lat[len(lat)//2]:.2f} p99={lat[int(len(lat)*0.99)]:.2f} max={lat[-1]:.2f} over2ms={big}")
