# The code interpreter's driver, run in the guest as `python3 -u -c <this> READY_NONCE MODE`
# (see interpreter.rs and interpreter/driver.rs). Protocol, one JSON object per line:
#   host -> driver (the original stdin):  {"nonce": "...", "code": "..."}
#   driver -> host (the original stdout): "<nonce> {answer JSON}", led by an empty line
# The first answer, unasked, is "<READY_NONCE> {"ready": true, "previous": bool}": `previous` says
# that an interpreter ran in this guest before (a marker file in /tmp; ignored when MODE is
# "fresh", after a deliberate reset), so that a new daemon can tell the caller that state was lost.
# The protocol descriptors are moved away from 0/1/2 before any user code runs: fd 0 becomes
# /dev/null and fds 1/2 become pipes that a thread drains into the current call's bounded buffers,
# so neither print() nor os.write(1, ...) nor a child process can reach the protocol stream (user
# code that writes to the protocol descriptor itself cannot guess the nonce). The interpreter ends
# when its stdin does. SIGINT raises KeyboardInterrupt only while user code runs; otherwise it is
# ignored (a late interrupt must not hit the next call).
import ast
import builtins
import json
import linecache
import os
import select
import signal
import sys
import threading
import traceback
import types

LIMIT = 1 << 20  # bytes kept per stream per call; also the bound of a result's repr
MARKER = "/tmp/.hearth-code-%d" % os.getuid()

proto_in = os.fdopen(os.dup(0), "rb")
proto_out = os.dup(1)
diagnostics = os.dup(2)  # the driver's own failures, for the host's message when it dies
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)


class Capture:
    """One redirected descriptor: a pipe whose read end is drained into a bounded buffer."""

    def __init__(self, fd):
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        os.set_blocking(r, False)
        self.fd = r
        self.data = bytearray()
        self.dropped = 0

    def drain(self):
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            room = LIMIT - len(self.data)
            self.data += chunk[:room]
            self.dropped += max(0, len(chunk) - room)

    def take(self):
        text = self.data.decode("utf-8", "replace")
        dropped = self.dropped
        self.data = bytearray()
        self.dropped = 0
        if dropped:
            text += "\n[... %d more bytes not kept]\n" % dropped
        return text, dropped > 0


out, err = Capture(1), Capture(2)
lock = threading.Lock()


def drainer():
    while True:
        select.select([out.fd, err.fd], [], [])
        with lock:
            out.drain()
            err.drain()


threading.Thread(target=drainer, daemon=True).start()


def text_stream(fd):
    return open(fd, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)


stdout, stderr = text_stream(1), text_stream(2)
running = False
interrupted = False


def on_sigint(signum, frame):
    global interrupted
    if running:
        interrupted = True
        raise KeyboardInterrupt


signal.signal(signal.SIGINT, on_sigint)
DRIVER_FILE = on_sigint.__code__.co_filename

main = types.ModuleType("__main__")
main.__dict__["__builtins__"] = builtins
sys.modules["__main__"] = main
namespace = main.__dict__


def send(nonce, answer):
    # Lone surrogates (from an exception message, say) cannot be UTF-8: replaced.
    # Led by a newline: a partial line user code left on the protocol fd cannot swallow it.
    line = "\n" + nonce + " " + json.dumps(answer, ensure_ascii=False) + "\n"
    data = line.encode("utf-8", "replace")
    while data:
        data = data[os.write(proto_out, data):]


def describe(e):
    # Without the driver's own frames (the exec around the cell, the SIGINT handler).
    te = traceback.TracebackException(type(e), e, e.__traceback__)
    te.stack = traceback.StackSummary.from_list(
        [f for f in te.stack if f.filename != DRIVER_FILE]
    )
    return {
        "name": type(e).__name__,
        "message": str(e)[:65536],
        "traceback": "".join(te.format())[-262144:],
    }


def run(code, count):
    """Runs one cell; returns (result repr or None, error or None)."""
    global running
    filename = "<cell-%d>" % count
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    try:
        tree = ast.parse(code, filename, "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        body = compile(tree, filename, "exec")
        tail = compile(last, filename, "eval") if last is not None else None
        running = True
        exec(body, namespace)
        value = eval(tail, namespace) if tail is not None else None
        running = False
        if value is None:
            return None, None
        builtins._ = value
        return repr(value)[:LIMIT], None
    except BaseException as e:  # noqa: B036 - the user's SystemExit and KeyboardInterrupt too
        running = False
        return None, describe(e)


def serve():
    global interrupted
    count = 0
    for line in proto_in:
        request = json.loads(line)
        count += 1
        interrupted = False
        sys.stdout, sys.stderr = stdout, stderr
        result, error = run(request["code"], count)
        for stream in (sys.stdout, sys.stderr, stdout, stderr):
            try:
                stream.flush()
            except Exception:
                pass
        with lock:
            out.drain()
            err.drain()
            stdout_text, out_cut = out.take()
            stderr_text, err_cut = err.take()
        send(
            request["nonce"],
            {
                "stdout": stdout_text,
                "stderr": stderr_text,
                "result": result,
                "error": error,
                "interrupted": interrupted,
                "execution_count": count,
                "truncated": out_cut or err_cut,
            },
        )


def ready():
    previous = os.path.exists(MARKER) and sys.argv[2] != "fresh"
    try:
        with open(MARKER, "w"):
            pass
    except OSError:
        pass
    send(sys.argv[1], {"ready": True, "previous": previous})


ready()
try:
    serve()
except KeyboardInterrupt:
    # Only outside a cell, where on_sigint does not raise; kept for a signal racing the exit.
    pass
except BaseException:
    os.write(diagnostics, traceback.format_exc().encode("utf-8", "replace"))
    raise SystemExit(70)
