"""A private Linux network namespace for network peers that cannot bind to loopback only.

Orthanc and DCMTK ``storescp`` listen on all interfaces. The test rule is that no test
traffic leaves 127.0.0.0/8, so such peers run inside a fresh network namespace that has
nothing but its own ``lo``. :class:`NetNamespace` creates that namespace, runs programs in it
(:meth:`NetNamespace.popen`), runs Python callables in a thread that joined it
(:meth:`NetNamespace.call`, :meth:`NetNamespace.start_thread`) and relays single TCP ports
between the namespace and the host loopback (:meth:`NetNamespace.expose_host_port`,
:meth:`NetNamespace.publish_port`).

Key facts (Linux ``setns(2)``, ``network_namespaces(7)``):

* The network namespace is a per-*thread* attribute. A thread that called ``setns`` creates
  its sockets inside the namespace; a socket stays in the namespace where it was created,
  whichever thread uses it later. So a pynetdicom server started (``block=False``) from a
  joined thread keeps listening inside the namespace, while the main test thread (and its
  PostgreSQL connections) stays in the host namespace.
* Threads inherit the namespace of the thread that created them.
* Needs CAP_SYS_ADMIN (the test container runs as root) and util-linux ``unshare`` and
  ``nsenter``; ``ip`` is not needed (``lo`` is brought up with an ioctl).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1

UNSHARE = "/usr/bin/unshare"
NSENTER = "/usr/bin/nsenter"
SETPRIV = "/usr/bin/setpriv"

_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceError(RuntimeError):
    """The namespace could not be created, joined or used."""


def namespaces_available() -> bool:
    """Return True when this process can create network namespaces (root + util-linux)."""
    if os.geteuid() != 0 or not (Path(UNSHARE).exists() and Path(NSENTER).exists()):
        return False
    try:
        return subprocess.run([UNSHARE, "--net", "true"], timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NamespaceError(f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


def _bring_up_loopback() -> None:
    """Set IFF_UP on ``lo`` in the calling thread's namespace (netdevice(7) ioctls)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Return True when a TCP connect to ``host:port`` succeeds (in the caller's namespace)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class _Relay:
    """Byte relay: accept on one socket, connect to ``target`` from the namespace ``connect_fd``.

    The accept loop and the pumps run in daemon threads that first join ``connect_fd``, so the
    outgoing socket is created in the right namespace. ``close`` stops everything.
    """

    def __init__(
        self, listener: socket.socket, target: tuple[str, int], connect_fd: int, name: str
    ) -> None:
        self.listener = listener
        self.target = target
        self._connect_fd = connect_fd
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept_loop, name=name, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        _setns(self._connect_fd)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5.0)
                upstream.settimeout(None)
            except OSError as exc:
                logger.warning(
                    "relay target unreachable", extra={"target": self.target, "err": exc}
                )
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._thread.join(timeout=2.0)
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()


class NetNamespace:
    """A private network namespace, held open by a bounded ``sleep`` loop.

    Use as a context manager; everything started through it is stopped on exit.

    Parameters
    ----------
    max_lifetime_s
        Upper bound on the life of the holder process (it also exits when this Python process
        disappears). Children started with :meth:`popen` get ``SIGKILL`` when this process dies.
    start_timeout_s
        Bound for creating the namespace.

    Examples
    --------
    >>> with NetNamespace() as ns:                               # doctest: +SKIP
    ...     port = ns.free_port()
    ...     proc = ns.popen(["/usr/bin/storescp", str(port)])
    ...     ns.wait_port(port, timeout_s=5)
    """

    def __init__(self, *, max_lifetime_s: float = 3600.0, start_timeout_s: float = 10.0) -> None:
        self.max_lifetime_s = max_lifetime_s
        self.start_timeout_s = start_timeout_s
        self._holder: subprocess.Popen[bytes] | None = None
        self._ns_fd: int | None = None
        self._host_fd: int | None = None
        self._children: list[subprocess.Popen[Any]] = []
        self._relays: list[_Relay] = []

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> NetNamespace:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> NetNamespace:
        """Create the namespace and bring up its ``lo`` (127.0.0.1/8 and ::1)."""
        if self._holder is not None:
            return self
        if not (Path(UNSHARE).exists() and Path(NSENTER).exists()):
            raise NamespaceError("util-linux unshare/nsenter not found")
        loops = max(1, int(self.max_lifetime_s))
        script = (
            'echo ready; i=0; while [ "$i" -lt "$1" ] && kill -0 "$2" 2>/dev/null; '
            "do sleep 1; i=$((i+1)); done"
        )
        self._host_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._holder = subprocess.Popen(
            [UNSHARE, "--net", "--", "sh", "-c", script, "holder", str(loops), str(os.getpid())],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            self._wait_ready()
            self._ns_fd = os.open(f"/proc/{self._holder.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            if os.stat(f"/proc/{self._holder.pid}/ns/net").st_ino == os.fstat(self._host_fd).st_ino:
                raise NamespaceError("holder did not get a new network namespace")
            self.call(_bring_up_loopback, timeout_s=self.start_timeout_s)
        except BaseException:
            self.close()
            raise
        logger.debug("network namespace ready", extra={"holder_pid": self._holder.pid})
        return self

    def _wait_ready(self) -> None:
        assert self._holder is not None and self._holder.stdout is not None
        fd = self._holder.stdout.fileno()
        deadline = time.monotonic() + self.start_timeout_s
        buf = b""
        os.set_blocking(fd, False)
        while b"ready" not in buf:
            if self._holder.poll() is not None:
                err = (
                    self._holder.stderr.read().decode(errors="replace")
                    if self._holder.stderr
                    else ""
                )
                raise NamespaceError(f"unshare --net failed (rc={self._holder.returncode}): {err}")
            if time.monotonic() > deadline:
                raise NamespaceError("timed out creating the network namespace")
            try:
                buf += os.read(fd, 64)
            except BlockingIOError:
                time.sleep(0.01)

    def close(self) -> None:
        """Stop relays and every child process, then the holder; bounded (about 10 s worst)."""
        for relay in self._relays:
            relay.close()
        self._relays.clear()
        for proc in reversed(self._children):
            _stop_process(proc, timeout_s=5.0)
        self._children.clear()
        if self._holder is not None:
            _stop_process(self._holder, timeout_s=2.0)
            for stream in (self._holder.stdout, self._holder.stderr):
                if stream is not None:
                    stream.close()
            self._holder = None
        for fd in (self._ns_fd, self._host_fd):
            if fd is not None:
                os.close(fd)
        self._ns_fd = self._host_fd = None

    # -- introspection -------------------------------------------------------------------
    @property
    def holder_pid(self) -> int:
        """PID of the process that holds the namespace open."""
        if self._holder is None:
            raise NamespaceError("namespace not started")
        return self._holder.pid

    @property
    def ns_path(self) -> str:
        """``/proc/<pid>/ns/net`` of the namespace (for ``nsenter --net=``)."""
        return f"/proc/{self.holder_pid}/ns/net"

    def _fd(self) -> int:
        if self._ns_fd is None:
            raise NamespaceError("namespace not started")
        return self._ns_fd

    # -- running things inside -----------------------------------------------------------
    def popen(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        die_with_parent: bool | None = None,
        **kw: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace (``nsenter --net``); stopped by :meth:`close`.

        Parameters
        ----------
        argv
            Program and arguments (absolute program path recommended).
        die_with_parent
            Wrap in ``setpriv --pdeathsig KILL`` so the child dies with this process. The kernel
            sends the signal when the *thread* that forked the child exits, so the default is
            True only when called from the main thread.
        **kw
            Passed to :class:`subprocess.Popen` (``stdout``, ``cwd``, ``text`` ...).
            ``start_new_session`` defaults to True so :meth:`close` can signal the group.
        """
        if die_with_parent is None:
            die_with_parent = threading.current_thread() is threading.main_thread()
        prefix = [NSENTER, f"--net={self.ns_path}", "--"]
        if die_with_parent and Path(SETPRIV).exists():
            prefix += [SETPRIV, "--pdeathsig", "KILL", "--"]
        kw.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen([*prefix, *map(str, argv)], **kw)
        self._children.append(proc)
        return proc

    def run(
        self, argv: Sequence[str | os.PathLike[str]], *, timeout_s: float = 60.0, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the namespace to completion; text output captured.

        Raises
        ------
        subprocess.TimeoutExpired
            After killing the process, when it outlives ``timeout_s``.
        """
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = self.popen(argv, text=True, **kw)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_process(proc, timeout_s=2.0)
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._children.remove(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def call(self, fn: Callable[..., T], *args: Any, timeout_s: float = 30.0, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in a fresh thread that joined the namespace.

        Returns its result or re-raises its exception. Sockets ``fn`` creates live in the
        namespace (also after it returns), so ``AE.start_server(..., block=False)`` called here
        gives a server listening inside the namespace.

        Raises
        ------
        TimeoutError
            When ``fn`` does not finish within ``timeout_s`` (the thread is left running as a
            daemon thread; make ``fn`` itself bounded).
        """
        return _call_in(self._fd(), functools.partial(fn, *args, **kwargs), timeout_s=timeout_s)

    def start_thread(
        self, fn: Callable[..., object], *args: Any, name: str | None = None, **kwargs: Any
    ) -> threading.Thread:
        """Start a daemon thread that joins the namespace, then runs ``fn`` (caller joins it).

        For long-running loops (a worker, a send loop) whose new sockets must be in the
        namespace. ``fn`` must stop by itself or on a signal from the test.
        """
        fd = self._fd()

        def runner() -> None:
            _setns(fd)
            fn(*args, **kwargs)

        thread = threading.Thread(target=runner, name=name or f"netns-{fn.__name__}", daemon=True)
        thread.start()
        return thread

    # -- ports ---------------------------------------------------------------------------
    def free_port(self) -> int:
        """Return a TCP port that is free on 127.0.0.1 inside the namespace right now."""

        def pick() -> int:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                return int(sock.getsockname()[1])

        return self.call(pick, timeout_s=5.0)

    def port_open(self, port: int) -> bool:
        """Return True when 127.0.0.1:``port`` accepts TCP connections inside the namespace."""
        return self.call(_port_open, port, timeout_s=5.0)

    def wait_port(
        self, port: int, *, timeout_s: float = 10.0, process: subprocess.Popen[Any] | None = None
    ) -> None:
        """Wait until 127.0.0.1:``port`` accepts connections inside the namespace.

        Raises
        ------
        NamespaceError
            When ``process`` exits first.
        TimeoutError
            When the port does not open within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while not self.port_open(port):
            if process is not None and process.poll() is not None:
                raise NamespaceError(
                    f"process exited (rc={process.returncode}) before port {port} opened"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"port {port} did not open within {timeout_s} s")
            time.sleep(0.02)

    def expose_host_port(self, host_port: int, *, ns_port: int | None = None) -> int:
        """Relay 127.0.0.1:``ns_port`` inside the namespace to 127.0.0.1:``host_port`` on the host.

        E.g. ``expose_host_port(5432)`` lets programs inside reach PostgreSQL, and exposing a
        host pynetdicom SCP lets Orthanc push to it. ``ns_port`` defaults to ``host_port``.
        Peers on the host see connections from 127.0.0.1. Returns the namespace port.
        """
        port = host_port if ns_port is None else ns_port

        def listen() -> socket.socket:
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))
            sock.listen(16)
            return sock

        listener = self.call(listen, timeout_s=5.0)
        assert self._host_fd is not None
        self._relays.append(
            _Relay(listener, ("127.0.0.1", host_port), self._host_fd, f"relay-in-{port}")
        )
        return int(listener.getsockname()[1])

    def publish_port(self, ns_port: int, *, host_port: int = 0) -> int:
        """Relay host 127.0.0.1:``host_port`` (0 = any free port) to ``ns_port`` inside.

        Lets host-side code (e.g. the daemon's C-STORE client) reach a peer in the namespace.
        The host listener binds 127.0.0.1 only. Returns the host port.
        """
        fd = self._fd()
        assert self._host_fd is not None

        def listen() -> socket.socket:
            sock = socket.socket()
            sock.bind(("127.0.0.1", host_port))
            sock.listen(16)
            return sock

        listener = _call_in(self._host_fd, listen, timeout_s=5.0)
        self._relays.append(_Relay(listener, ("127.0.0.1", ns_port), fd, f"relay-out-{ns_port}"))
        return int(listener.getsockname()[1])


def _call_in(fd: int, fn: Callable[[], T], *, timeout_s: float) -> T:
    """Run ``fn`` in a fresh daemon thread that joined the namespace open at ``fd``."""
    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            _setns(fd)
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    name = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "fn")
    thread = threading.Thread(target=runner, name=f"netns-call-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{name} did not finish within {timeout_s} s in the namespace")
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def _stop_process(proc: subprocess.Popen[Any], *, timeout_s: float) -> None:
    """SIGTERM the process group of ``proc`` (it leads its own session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, 9)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=2.0)
