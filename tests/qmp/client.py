#!/usr/bin/env python3
"""Drives a running ringvm with the real qemu.qmp client library.

Usage: client.py SOCKET. Prints one line per checked step; exits non-zero
(with the reason) on the first failed check. Every wait has a deadline.
"""
import asyncio
import sys

from qemu.qmp import EventListener, ExecuteError, QMPClient

T = 10.0  # seconds, per step


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


async def next_event(listener, name):
    while True:
        ev = await asyncio.wait_for(listener.get(), T)
        if ev["event"] == name:
            return ev


async def main(sock):
    qmp = QMPClient("ringvm-test")
    await asyncio.wait_for(qmp.connect(sock), T)
    check(qmp.greeting is not None, "greeting and capabilities negotiation")
    ver = await qmp.execute("query-version")
    check(ver["package"].startswith("ringvm ") and ver["qemu"]["major"] >= 1, f"query-version: {ver}")
    cmds = {c["name"] for c in await qmp.execute("query-commands")}
    check({"stop", "cont", "system_reset", "quit", "query-status"} <= cmds, "query-commands lists the run-control commands")
    st = await qmp.execute("query-status")
    check(st == {"running": True, "status": "running"}, f"query-status while mem runs: {st}")
    cpus = await qmp.execute("query-cpus-fast")
    check(len(cpus) >= 1 and all(c["thread-id"] > 0 for c in cpus), f"query-cpus-fast: {len(cpus)} vCPU(s) with thread ids")

    events = EventListener()
    with qmp.listen(events):
        await qmp.execute("stop")
        await next_event(events, "STOP")
        st = await qmp.execute("query-status")
        check(st == {"running": False, "status": "paused"}, f"stop -> STOP event, {st}")
        await qmp.execute("cont")
        await next_event(events, "RESUME")
        st = await qmp.execute("query-status")
        check(st["status"] == "running", "cont -> RESUME event, running")
        await qmp.execute("system_reset")
        ev = await next_event(events, "RESET")
        check(ev["data"] == {"guest": False, "reason": "host-qmp-system-reset"}, f"system_reset -> RESET {ev['data']}")
        print("RESET-SENT", flush=True)

        try:
            await qmp.execute("no-such-command")
            check(False, "unknown command is an error")
        except ExecuteError as e:
            check(e.error_class == "CommandNotFound", f"unknown command -> {e.error_class}")
        try:
            await qmp.execute("human-monitor-command", {"command-line": 42})
            check(False, "mistyped argument is an error")
        except ExecuteError as e:
            check(e.error_class == "GenericError" and "command-line" in str(e), f"mistyped argument -> {e}")
        hmp = await qmp.execute("human-monitor-command", {"command-line": "info status"})
        check(hmp.strip() == "VM status: running", f"HMP info status -> {hmp.strip()!r}")

        # Wait for the guest to come back from its entry point before quitting.
        line = sys.stdin.readline()
        check(line.strip() == "GUEST-RESTARTED", "guest restarted from its entry point")
        await qmp.execute("quit")
        ev = await next_event(events, "SHUTDOWN")
        check(ev["data"]["reason"] == "host-qmp-quit", "quit -> SHUTDOWN host-qmp-quit")
    # The server ends the stream after `quit`, as QEMU does when it exits. If the
    # reader saw that end before disconnect() ran, qemu.qmp re-raises it as
    # EOFError; QEMU's own python/qemu/machine/machine.py accepts EOFError
    # after a `quit` it issued, and so does this client. Anything else is a failure.
    try:
        await qmp.disconnect()
    except EOFError:
        print("ok: the server ended the stream after quit", flush=True)
    print("DONE", flush=True)


asyncio.run(main(sys.argv[1]))
