"""The machinery of tests/test_fuzz.py: a sandbox that runs CLI calls with bounded time and
memory, the contract every call is checked against, and writers of malformed files.

The sandbox is one worker process that imports expertlora once and runs each call in-process
through typer's CliRunner (as tests/test_bad_input.py does, so a call costs milliseconds); the
test process waits for each answer at most ``HARD_TIMEOUT`` seconds and kills and restarts the
worker when a call hangs (a catastrophic regex) or dies (a native crash). The worker's address
space is capped (RLIMIT_AS) so a size bomb fails with MemoryError instead of taking the machine,
and its peak RSS is reset before each call so each call's own peak is measured.

``EXPERTLORA_FUZZ_RECORD=FILE``: violations are appended to FILE as JSON lines instead of
failing the test, to catalogue every distinct violation of a run in one go.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

VALID, INVALID, EITHER = "valid", "invalid", "either"
CALL_SECONDS = 4.0  # each call must finish within this (tiny inputs take ~0.05 s)
HARD_TIMEOUT = 12.0  # a call still running then is killed: a hang
MEM_MB = 512  # each call's peak RSS above the worker's resting RSS
ADDRESS_HEADROOM = 3 << 30  # RLIMIT_AS: the warmed-up worker's address space plus this
ROOT = Path(__file__).resolve().parent.parent


# ---- the sandbox -------------------------------------------------------------------------------


@dataclass
class Call:
    """What one CLI call (or library call) did, as the worker saw it."""

    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    exc_type: str | None = None  # an exception that escaped (not SystemExit)
    exc_message: str = ""
    traceback: str = ""
    seconds: float = 0.0
    peak_mb: float = 0.0
    hang: bool = False
    crash: str | None = None  # the worker died: signal or exit status, and its last log lines
    ok: bool = True  # library calls: returned without an exception
    is_adapter_error: bool = False

    def as_result(self):
        """A stand-in for click's Result, for tests/test_bad_input.py's assert_error."""
        exc = RuntimeError(f"{self.exc_type}: {self.exc_message}\n{self.traceback[-1500:]}") if self.exc_type else None
        return SimpleNamespace(exception=exc, exit_code=self.exit_code, stderr=self.stderr, stdout=self.stdout)


class Sandbox:
    """A fork server and its current worker: the server imports expertlora, transformers and peft
    once; each worker is forked from it, warmed up, capped, and replaced after a hang or a crash."""

    def __init__(self, warmup: list[list[str]] = ()):
        self.warmup = [list(map(str, a)) for a in warmup]
        self.server: subprocess.Popen | None = None
        self.worker: int | None = None  # the pid of the current worker (a child of the server)
        self.log = Path(tempfile.mkstemp(prefix="fuzz-worker-", suffix=".log")[1])
        self.restarts = 0
        self._buf = b""

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env.setdefault("TRITON_INTERPRET", "1")
        with open(self.log, "ab") as log:
            self.server = subprocess.Popen(
                [sys.executable, "-c", "from tests.fuzz_inputs import _serve; _serve()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, env=env, bufsize=0,
            )
        self._new_worker(timeout=600)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stdin.close()  # the worker's loop ends, then the server's
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
            self.server = self.worker = None
        self.log.unlink(missing_ok=True)

    def cli(self, argv) -> Call:
        return self._ask({"op": "cli", "argv": [str(a) for a in argv]})

    def api(self, func: str, *args) -> Call:
        return self._ask({"op": "api", "func": func, "args": [None if a is None else str(a) for a in args]})

    def _new_worker(self, timeout: float = 120) -> None:
        """Read the next worker's hello, warm it up (lazy imports, compiled kernels), then cap it."""
        hello = self._message(timeout)
        while hello is not None and "pid" not in hello:  # the death notice of the worker before
            hello = self._message(timeout)
        if hello is None:
            raise RuntimeError(f"the sandbox server did not start a worker; log: {self.log.read_text(errors='replace')[-2000:]}")
        self.worker = hello["pid"]
        for argv in self.warmup:
            call = self._ask({"op": "cli", "argv": argv}, timeout=600)
            if call.exit_code != 0:
                raise RuntimeError(f"sandbox warm-up {argv} failed: {call}")
        self._ask({"op": "limit", "headroom": ADDRESS_HEADROOM}, timeout=60)

    def _ask(self, request: dict, timeout: float = HARD_TIMEOUT) -> Call:
        if self.server is None:
            self.start()
        self.server.stdin.write((json.dumps(request) + "\n").encode())
        answer = self._message(timeout)
        if answer is None:  # still running: a hang
            os.kill(self.worker, signal.SIGKILL)  # our own worker, by its pid
            self.restarts += 1
            self._new_worker()
            return Call(hang=True, seconds=timeout)
        if "died" in answer:
            code = answer["died"]
            why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            self.restarts += 1
            self._new_worker()
            return Call(crash=f"{why}; worker log ends: {self.log.read_text(errors='replace')[-1500:]}")
        return Call(**answer)

    def _message(self, timeout: float) -> dict | None:
        """The next JSON line from the server or its worker; None after ``timeout`` seconds."""
        out, end = self.server.stdout, time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([out], [], [], left)[0]:
                return None
            chunk = os.read(out.fileno(), 1 << 20)
            if not chunk:
                raise RuntimeError(f"the sandbox server died; log: {self.log.read_text(errors='replace')[-2000:]}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)


def _serve() -> None:
    """The fork server: import once, then fork one worker at a time and report each one's death."""
    import warnings

    proto = os.dup(1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # native code printing on fd 1 cannot corrupt the answers
    os.umask(0o022)
    # the filters pyproject.toml gives the test suite
    warnings.filterwarnings("ignore", message=".*(rank|alpha)_pattern keys did not match.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import accelerate  # noqa: F401 - the heavy imports, done once for every worker
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import expertlora.cli  # noqa: F401
    import expertlora.integration  # noqa: F401
    import expertlora.run  # noqa: F401

    while True:
        pid = os.fork()
        if pid == 0:
            _worker(proto)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code == 0:  # stdin closed: the test session is over
            return
        os.write(proto, (json.dumps({"died": code}) + "\n").encode())


def _worker(proto_fd: int) -> None:
    """A worker's loop: one JSON request per line on stdin, one JSON answer per line."""
    import resource
    import traceback

    from typer.testing import CliRunner

    import expertlora
    from expertlora.cli import app

    proto = os.fdopen(proto_fd, "w", buffering=1)
    proto.write(json.dumps({"pid": os.getpid()}) + "\n")
    runner = CliRunner()

    def status(key: str) -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

    def measured(fn) -> dict:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM: the peak below is this call's
        except OSError:
            pass
        rss, t0 = status("VmRSS:"), time.perf_counter()
        out = fn()
        out.update(seconds=time.perf_counter() - t0, peak_mb=status("VmHWM:") - rss)
        return out

    def cli(argv):
        r = runner.invoke(app, argv)
        exc = r.exception if r.exception is not None and not isinstance(r.exception, SystemExit) else None
        return dict(
            exit_code=r.exit_code, stdout=r.stdout, stderr=r.stderr,
            exc_type=type(exc).__name__ if exc else None, exc_message=str(exc)[:2000] if exc else "",
            traceback="".join(traceback.format_exception(*r.exc_info))[-6000:] if exc else "",
        )

    def api(func: str, args: list):
        from expertlora import MoEConfig
        from expertlora.checkpoint import Checkpoint
        from expertlora.errors import AdapterError
        from expertlora.peft_config import PeftLoraConfig

        calls = {
            "load_adapter": lambda path, base=None: expertlora.load_adapter(path, MoEConfig.from_model_dir(base) if base else None),
            "moe_config": MoEConfig.from_model_dir,
            "peft_config": PeftLoraConfig.from_file,
            "checkpoint": lambda d: [Checkpoint(d).expert_tensors(L) for L in Checkpoint(d).config.moe_layers],
        }
        try:
            calls[func](*args)
            return dict(ok=True)
        except Exception as e:  # noqa: BLE001 - reported, judged by the test
            return dict(ok=False, is_adapter_error=isinstance(e, AdapterError), exc_type=type(e).__name__,
                        exc_message=str(e)[:2000], traceback=traceback.format_exc()[-6000:])

    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "limit":
            cap = int(status("VmSize:") * 1024) + req["headroom"]
            resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
            answer = {}
        elif req["op"] == "cli":
            answer = measured(lambda: cli(req["argv"]))
        else:
            answer = measured(lambda: api(req["func"], req["args"]))
        proto.write(json.dumps(answer) + "\n")


# ---- the contract ----------------------------------------------------------------------------------


def digest(*paths: Path) -> dict[str, str]:
    """Every file under ``paths`` with a hash of its bytes: an input must never change."""
    out = {}
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*")) if root.exists() else []
        for p in files:
            out[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@dataclass
class Expect:
    """What one generated input must give, and where to look for side effects."""

    outcome: str  # VALID, INVALID or EITHER
    note: str = ""  # what was generated, in words (for the report)
    inputs: tuple[Path, ...] = ()  # never modified
    out_folder: Path | None = None  # nothing new in it after a refusal
    output: Path | None = None  # the -o path of convert / export-peft
    needles: tuple[str, ...] = ()  # a refusal must name these
    readback: tuple[str, ...] | None = ()  # extra arguments of `inspect OUTPUT` after a success; None: skip
    exit_codes: tuple[int, ...] = (2,)  # of a refusal (1 is accepted where only an I/O failure on the output is)


class Violation(AssertionError):
    pass


def check_cli(sandbox: Sandbox, argv, expect: Expect, *, test: str = "") -> Call:
    """Run ``argv`` in the sandbox and check the contract; a violation raises (or is recorded)."""
    argv = [str(a) for a in argv]
    before_inputs = digest(*expect.inputs)
    before_out = listing(expect.out_folder) if expect.out_folder else set()
    call = sandbox.cli(argv)
    problems = _judge(sandbox, argv, call, expect, before_inputs, before_out)
    _report(problems, test, argv, call, expect)
    return call


def check_api(sandbox: Sandbox, func: str, args, expect: Expect, *, test: str = "") -> Call:
    """A library call: it returns (valid input) or raises AdapterError with a one-line message."""
    call = sandbox.api(func, *args)
    problems = _bounds(call)
    if not problems:
        if call.ok and expect.outcome == INVALID:
            problems.append(f"{func} accepted an invalid input")
        elif not call.ok and expect.outcome == VALID:
            problems.append(f"{func} refused a valid input: {call.exc_type}: {call.exc_message}")
        elif not call.ok and not call.is_adapter_error:
            problems.append(f"{func} raised {call.exc_type}, not AdapterError: {call.exc_message[:300]}\n{call.traceback[-1200:]}")
        elif not call.ok and "\n" in call.exc_message:
            problems.append(f"{func}: a message of several lines: {call.exc_message[:300]!r}")
    _report(problems, test, [func, *map(str, args)], call, expect)
    return call


def _bounds(call: Call) -> list[str]:
    if call.hang:
        return [f"still running after {HARD_TIMEOUT:.0f} s (killed)"]
    if call.crash:
        return [f"the process died: {call.crash}"]
    out = []
    if call.seconds > CALL_SECONDS:
        out.append(f"took {call.seconds:.1f} s (bound {CALL_SECONDS} s)")
    if call.peak_mb > MEM_MB:
        out.append(f"peak RSS {call.peak_mb:.0f} MiB above resting (bound {MEM_MB} MiB)")
    return out


def _judge(sandbox, argv, call: Call, expect: Expect, before_inputs, before_out) -> list[str]:
    problems = _bounds(call)
    if call.hang or call.crash:
        return problems
    if digest(*expect.inputs) != before_inputs:
        problems.append("an input file was modified or removed")
    succeeded = call.exit_code == 0 and call.exc_type is None
    if expect.outcome == VALID or (expect.outcome == EITHER and succeeded):
        if not succeeded:
            problems.append(f"a valid input was refused: exit {call.exit_code}, {call.exc_type or ''} {call.stderr.strip()[:400]!r} {call.traceback[-800:]}")
        else:
            problems += _check_success(sandbox, argv, call, expect, before_out)
    else:
        if succeeded:
            problems.append("an invalid input was accepted (exit 0)")
        else:
            try:
                from .test_bad_input import assert_error

                result = call.as_result()
                if result.exit_code in expect.exit_codes:
                    result.exit_code = 2
                line = assert_error(result, *expect.needles)
                if any(ord(c) < 32 or c == "\x7f" for c in line):
                    problems.append(f"control characters in the error line: {line!r}")
            except AssertionError as e:
                problems.append(f"not the one-line refusal: {e}"[:2500])
        if expect.out_folder is not None and listing(expect.out_folder) != before_out:
            problems.append(f"left {sorted(listing(expect.out_folder) - before_out) or 'a changed output folder'}")
    return problems


def _check_success(sandbox, argv, call: Call, expect: Expect, before_out) -> list[str]:
    problems = []
    if "Traceback" in call.stderr:
        problems.append(f"a traceback on stderr: {call.stderr[-600:]!r}")
    out = expect.output
    if out is None:
        return problems
    if not out.exists():
        return problems + [f"succeeded but wrote nothing at {out}"]
    new = listing(expect.out_folder) - before_out if expect.out_folder else set()
    leftovers = [n for n in new if ".tmp-" in n and not (expect.out_folder / n == out or out in (expect.out_folder / n).parents)]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    for p in [out, *out.rglob("*")] if out.is_dir() else [out]:
        mode = p.stat().st_mode & 0o777
        want = 0o755 if p.is_dir() else 0o644
        if mode != want:
            problems.append(f"{p.name}: mode {mode:o}, expected {want:o} under umask 022")
            break
    if out.is_file() and out.suffix in (".pt", ".pth", ".bin") and out.read_bytes()[:4] != b"PK\x03\x04":
        problems.append(f"-o {out.name}: wrote something other than a torch .pt file under that name")
    if out.suffix != ".bin" and expect.readback is not None and not problems:
        back = sandbox.cli(["inspect", str(out), *expect.readback, "--no-progress"])
        if back.exit_code != 0:
            problems.append(f"the output does not read back: {back.stderr.strip()[:300]}")
    return problems


def _report(problems: list[str], test: str, argv, call: Call, expect: Expect) -> None:
    if not problems:
        return
    record = os.environ.get("EXPERTLORA_FUZZ_RECORD")
    if record:
        entry = dict(test=test, note=expect.note, expect=expect.outcome, argv=argv, problems=problems,
                     exit_code=call.exit_code, stderr=call.stderr[-1500:], exc=call.exc_type, exc_message=call.exc_message[:500],
                     traceback_tail=call.traceback[-1500:])
        with open(record, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return
    raise Violation(f"{expect.note} [expected: {expect.outcome}]\n  argv: {argv}\n  " + "\n  ".join(problems))


# ---- writing malformed files -------------------------------------------------------------------------


class Raw:
    """A JSON token written as is: ``1e400``, a 5,000-digit integer, deep nesting."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:30]!r}{'...' if len(self.text) > 30 else ''}, {len(self.text)} chars)"


def dump_json(obj) -> str:
    """json.dumps, plus Raw tokens (NaN and Infinity come out as Python writes them)."""
    raws: list[str] = []

    def placeholder(o):
        if isinstance(o, Raw):
            raws.append(o.text)
            return f"\x00raw{len(raws) - 1}\x00"
        raise TypeError(type(o).__name__)

    text = json.dumps(obj, default=placeholder)
    for i, t in enumerate(raws):
        text = text.replace(f'"\\u0000raw{i}\\u0000"', t)
    return text


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    """A safetensors file as (header dict, data bytes)."""
    b = Path(path).read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8 : 8 + n]), b[8 + n :]


def safetensors_bytes(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file from a header (dict or raw bytes) and data; ``length`` overrides the prefix."""
    hb = header if isinstance(header, bytes) else dump_json(header).encode()
    return struct.pack("<Q", len(hb) if length is None else length) + hb + data


def nested(depth: int, leaf: str = "1") -> Raw:
    return Raw("[" * depth + leaf + "]" * depth)
