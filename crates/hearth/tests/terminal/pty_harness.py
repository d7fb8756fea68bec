"""Drives `hearth ... -it ... sh` inside a real pseudo-terminal, as a person at a terminal would.

Usage: pty_harness.py full|sigterm|sighup -- HEARTH-ARGV...

full:    types `tty` and `stty size` (the guest's terminal is a device of our size), resizes our
         window (the guest follows), interrupts `sleep 100` with ^C (the shell survives), exits 3
         (hearth exits 3) and checks our terminal's modes are restored.
sigterm, sighup: waits for the shell, checks our terminal is raw meanwhile, sends hearth that
         signal and checks it exits 128+N with the terminal's modes restored.
Exits 0 when every check passed; otherwise prints what failed and what the terminal showed.
"""

import fcntl
import os
import pty
import select
import signal
import struct
import sys
import termios
import time

BOOT_WAIT = 180  # seconds: pull + boot under TCG on a busy machine
STEP_WAIT = 60


def set_size(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Screen:
    def __init__(self, fd):
        self.fd = fd
        self.seen = b""
        self.consumed = 0

    def pump(self, timeout):
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not data:
            return False
        self.seen += data
        return True

    def expect(self, needle, wait=STEP_WAIT):
        needle = needle.encode()
        deadline = time.time() + wait
        while True:
            at = self.seen.find(needle, self.consumed)
            if at >= 0:
                self.consumed = at + len(needle)
                return
            left = deadline - time.time()
            if left <= 0 or not self.pump(min(left, 1.0)):
                fail(f"no {needle!r} within {wait} s", self)

    def type(self, text):
        os.write(self.fd, text.encode())


def fail(message, screen):
    print(f"FAILED: {message}\n--- the terminal showed ---\n"
          f"{screen.seen.decode(errors='replace')}\n---", flush=True)
    sys.exit(1)


def modes(fd):
    # On Linux the master reports the slave's modes: those hearth changes and must restore.
    return termios.tcgetattr(fd)


def is_raw(attrs):
    lflag = attrs[3]
    return not (lflag & termios.ICANON) and not (lflag & termios.ECHO) and not (lflag & termios.ISIG)


def wait_exit(pid, screen, wait=STEP_WAIT):
    deadline = time.time() + wait
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        screen.pump(0.2)
    fail(f"hearth did not exit within {wait} s", screen)


def main():
    scenario, argv = sys.argv[1], sys.argv[3:]
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(argv[0], argv)
    set_size(fd, 30, 100)
    screen = Screen(fd)
    before = modes(fd)
    if is_raw(before):
        fail("the terminal starts raw", screen)

    # Markers are computed by the guest's shell, so the echo of what we type never matches.
    screen.type("tty; echo tty-$((6*7)); stty size\n")
    screen.expect("/dev/pts/", BOOT_WAIT)
    screen.expect("tty-42")
    screen.expect("30 100")
    if not is_raw(modes(fd)):
        fail("hearth did not put the terminal into raw mode", screen)
    print("ok: the guest's stdin is a terminal of our size", flush=True)

    if scenario in ("sigterm", "sighup"):
        number = signal.SIGTERM if scenario == "sigterm" else signal.SIGHUP
        os.kill(pid, number)
        code = wait_exit(pid, screen)
        if code != 128 + number:
            fail(f"hearth exited {code} on {scenario}, not {128 + number}", screen)
        if modes(fd) != before:
            fail(f"the terminal's modes were not restored after {scenario}", screen)
        print(f"ok: {scenario}: exit {code}, terminal restored", flush=True)
        return

    set_size(fd, 40, 120)  # the kernel sends hearth SIGWINCH
    deadline = time.time() + STEP_WAIT
    while True:
        screen.type("stty size; echo size-$((1+1))\n")
        screen.expect("size-2")
        tail = screen.seen[max(0, screen.consumed - 200):screen.consumed]
        if b"40 120" in tail:
            break
        if time.time() > deadline:
            fail("the guest's terminal did not follow our resize", screen)
        time.sleep(0.5)
    print("ok: a resize reaches the guest", flush=True)

    # A separate process for sure (busybox may run a plain `sleep` inside the shell), and ^C only
    # once it runs: typed earlier, it would be read as data by the shell's line editor.
    screen.type("sh -c 'echo sleeping-$((1+2)); exec sleep 100'\n")
    screen.expect("sleeping-3")
    time.sleep(1)
    screen.type("\x03")
    screen.type("echo alive-$((4+4))\n")
    screen.expect("alive-8", 30)  # far less than sleep's 100 s: ^C interrupted it
    print("ok: ^C interrupts the foreground command and the shell lives on", flush=True)

    screen.type("exit 3\n")
    code = wait_exit(pid, screen)
    if code != 3:
        fail(f"hearth exited {code}, not the shell's 3", screen)
    if modes(fd) != before:
        fail("the terminal's modes were not restored", screen)
    print("ok: exit code passed on, terminal restored", flush=True)


main()
