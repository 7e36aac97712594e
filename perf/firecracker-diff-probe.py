#!/usr/bin/env python3
"""Firecracker's full and diff snapshot of the test guest, by hand (a
reference for perf/README.md, session 17; not yet a harness column).

Usage: FC=path/to/firecracker perf/firecracker-diff-probe.py [MIB]   (default 4096)
  BIN=path/to/ringvm (default target/release/ringvm: only for `guest-image`)

Boots ringvm's test guest under Firecracker (`--config-file`, 1 vCPU, MIB of
RAM, `track_dirty_pages`), waits until it has filled 90% of its RAM (then it
rewrites it at 100 MiB/s), takes a Full snapshot (pause, /snapshot/create,
resume), lets the guest rewrite 1% of the RAM in use, takes a Diff snapshot,
and prints the time of each (pause to resume: Firecracker snapshots with the
guest paused) and the memory files' bytes on disk. Files go to
target/fcsnap (removed after). The Firecracker process is ended by its PID.

Firecracker is not packaged here; session 17 built it from source
(firecracker-microvm/firecracker 81b38b9 through the library's fetch tool):
its micro_http git dependency fetched the same way and patched in
(`[patch."https://github.com/firecracker-microvm/micro-http"] micro_http =
{ path = ... }` in its Cargo.toml), `apt-get install libclang-dev cmake
libseccomp-dev`, then `RUSTUP_TOOLCHAIN=stable cargo build --release -p
firecracker` (its rust-toolchain.toml pins a toolchain not installed here).
"""
import json, os, subprocess, time, sys, threading, http.client, socket, shutil, tempfile
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FC = os.environ.get("FC") or sys.exit("FC=path/to/firecracker is needed (see the docstring)")
BIN = os.environ.get("BIN", os.path.join(root, "target/release/ringvm"))
MIB = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
FILL = MIB * 9 // 10
D = os.path.join(root, "target/fcsnap")
tmp = tempfile.mkdtemp(prefix="ringvm-fc-")
guest = os.path.join(tmp, "guest.elf")
subprocess.run([BIN, "guest-image", "--out", guest], check=True)
os.makedirs(D, exist_ok=True)
for f in os.listdir(D): os.remove(os.path.join(D,f))
cfg={"boot-source":{"kernel_image_path":guest,"boot_args":f"work=mem mib={FILL} secs=inf rate=100 beat=100"},"drives":[],
     "machine-config":{"vcpu_count":1,"mem_size_mib":MIB,"track_dirty_pages":True}}
json.dump(cfg,open(os.path.join(tmp,"fc.json"),"w"))
sock=os.path.join(tmp,"fc.sock")
if os.path.exists(sock): os.remove(sock)
p=subprocess.Popen([FC,"--api-sock",sock,"--config-file",os.path.join(tmp,"fc.json"),"--log-path",os.path.join(tmp,"fc.log"),"--level","Warn"],stdout=subprocess.PIPE,stderr=subprocess.DEVNULL,text=True)
ev=threading.Event()
def w():
    for l in p.stdout:
        if "fill done" in l: ev.set()
threading.Thread(target=w,daemon=True).start()
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock=socket.socket(socket.AF_UNIX); self.sock.settimeout(600); self.sock.connect(sock)
def req(m,path,body):
    c=C("localhost"); c.request(m,path,json.dumps(body),{"Content-Type":"application/json"}); r=c.getresponse(); d=r.read()
    if r.status>=300: raise SystemExit(f"{m} {path}: {r.status} {d}")
def snap(kind,i):
    t0=time.monotonic()
    req("PATCH","/vm",{"state":"Paused"})
    req("PUT","/snapshot/create",{"snapshot_type":kind,"snapshot_path":f"{D}/vm{i}.snap","mem_file_path":f"{D}/mem{i}"})
    req("PATCH","/vm",{"state":"Resumed"})
    return (time.monotonic()-t0)*1e3
try:
    if not ev.wait(600):
        raise SystemExit("the guest did not fill its memory in 600 s")
    full=snap("Full",0)
    time.sleep(FILL*0.01/100)
    diff=snap("Diff",1)
    du=lambda f: os.stat(f).st_blocks*512/1e6
    print(f"{MIB} MiB: Firecracker full {full:.0f} ms ({du(D+'/mem0'):.0f} MB on disk), diff after 1% rewritten {diff:.0f} ms ({du(D+'/mem1'):.0f} MB on disk), diff/full {diff/full:.3f}")
finally:
    p.kill(); p.wait()
    shutil.rmtree(D, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
