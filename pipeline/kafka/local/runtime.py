"""Java, the jars of a local Apache Kafka broker, the JVM processes that run it, ports.

The broker is `org.apache.kafka:kafka_2.13` from Maven Central (see `pom.xml` next to this
file). Maven resolves it once into its own repository (~/.m2, or `$IOTFUSE_MAVEN_REPO`); the
resulting classpath is cached outside the repository in
`$IOTFUSE_CACHE_DIR/kafka-<version>/classpath.txt` (default cache dir `~/.cache/iotfuse`).
Later runs reuse the cached classpath without calling Maven while all its jars exist.

JVMs started here (`spawn`) never outlive this process: each leads its own session so the
whole group can be signalled, and on Linux the kernel SIGKILLs it when its parent dies
(PR_SET_PDEATHSIG). Caveat: that fires when the *thread* that started the JVM exits, so start
JVMs from a thread that lives as long as they should (normally the main thread).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.1.0"  # must match <kafka.version> in pom.xml
MIN_JAVA = 17
_PR_SET_PDEATHSIG = 1
_NO_BROKER_HINT = "or point --bootstrap-servers at an existing broker"


class KafkaRuntimeError(RuntimeError):
    """Java, Maven or the broker jars are missing or unusable."""


@dataclass(frozen=True, slots=True)
class KafkaRuntime:
    java: str  # path of the java executable
    java_major: int
    java_version: str  # `java -version` output
    classpath: tuple[Path, ...]
    cache: Path  # the cache directory of this Kafka version

    @property
    def classpath_arg(self) -> str:
        return os.pathsep.join(str(p) for p in self.classpath)

    @property
    def class_archive(self) -> Path:
        """The JVM class-data-sharing archive for this exact Java and classpath.

        The first broker writes it when it stops (-XX:ArchiveClassesAtExit); later JVMs map
        it (-XX:SharedArchiveFile) and start about twice as fast.
        """
        identity = "\n".join((self.java, self.java_version, self.classpath_arg))
        digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
        return self.cache / f"classes-{digest}.jsa"

    def java_command(self, heap: str, log_config: Path, log_file: Path) -> list[str]:
        """java and the options every JVM here shares; append more options, main class, args."""
        archive = self.class_archive
        shared = [f"-XX:SharedArchiveFile={archive}"] if archive.is_file() else []
        return [
            self.java,
            f"-Xmx{heap}",
            "-XX:+UseSerialGC",  # fewer threads than G1: quicker on a 2-core machine
            "-XX:TieredStopAtLevel=1",  # C1 only: starts much faster, fast enough for tests
            "-XX:-UsePerfData",  # no /tmp/hsperfdata_* files
            *shared,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log_config}",
            f"-Diotfuse.kafka.log={log_file}",
            "-cp",
            self.classpath_arg,
        ]

    def archive_dump_target(self) -> Path | None:
        """Where a JVM should write the class archive (-XX:ArchiveClassesAtExit), if missing.

        Pass the path to `publish_archive` once that JVM has exited.
        """
        archive = self.class_archive
        if archive.exists():
            return None
        return archive.with_name(f"{archive.name}.{uuid.uuid4().hex[:8]}.tmp")


def publish_archive(dumped: Path, complete: bool) -> None:
    """Move a class archive a JVM wrote at exit into place, or drop a partial one."""
    if complete and dumped.is_file() and dumped.stat().st_size > 0:
        final = dumped.with_name(dumped.name.rsplit(".", 2)[0])  # strip .<id>.tmp
        os.replace(dumped, final)  # atomic: a starting JVM maps the old file or the new one
    else:
        dumped.unlink(missing_ok=True)


def spawn(cmd: Sequence[str], cwd: Path, stdout: int | None) -> subprocess.Popen[bytes]:
    """Start a JVM in its own session that dies with this process (Linux)."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent(),
    )


def stop(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> list[bool]:
    """SIGTERM all at once, wait until the deadline, then SIGKILL; per process: whether it
    exited on its own (not killed)."""
    for proc in procs:
        send_signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    on_their_own = []
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            on_their_own.append(True)
        except subprocess.TimeoutExpired:
            send_signal(proc, signal.SIGKILL)
            proc.wait()
            on_their_own.append(False)
    return on_their_own


def send_signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the process group `spawn` made, unless the process was already reaped."""
    if proc.poll() is not None:  # reaped: its pid may belong to someone else now
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when this thread's process dies."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def load_runtime() -> KafkaRuntime:
    """Java (17+) and the broker classpath, downloading the jars on first use."""
    java, major, version = find_java()
    directory = cache_dir()
    return KafkaRuntime(
        java=java,
        java_major=major,
        java_version=version,
        classpath=resolve_classpath(directory),
        cache=directory,
    )


def find_java() -> tuple[str, int, str]:
    """The java executable ($JAVA_HOME/bin/java, else `java` on PATH), its major version and
    its `java -version` output."""
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home, "bin", "java") if java_home else None
    java = str(candidate) if candidate and candidate.exists() else shutil.which("java")
    if java is None:
        raise KafkaRuntimeError(
            f"Java {MIN_JAVA}+ is required to run the local Kafka broker: install a JDK "
            f"(e.g. apt-get install openjdk-17-jre-headless) {_NO_BROKER_HINT}"
        )
    done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    version = (done.stderr + done.stdout).strip()
    major = java_major_version(version)
    if major < MIN_JAVA:
        raise KafkaRuntimeError(
            f"Java {MIN_JAVA}+ is required to run the local Kafka broker, but {java} is "
            f"Java {major}: install a newer JDK (e.g. apt-get install openjdk-17-jre-headless) "
            f"and put it first on PATH or in JAVA_HOME, {_NO_BROKER_HINT}"
        )
    return java, major, version


def java_major_version(version_output: str) -> int:
    """Major version from `java -version` output ('1.8.0_292' -> 8, '17.0.15' -> 17)."""
    found = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if found is None:
        raise KafkaRuntimeError(
            f"cannot tell the Java version from `java -version` output {version_output!r}: "
            f"install Java {MIN_JAVA}+ (e.g. apt-get install openjdk-17-jre-headless)"
        )
    first, second = int(found.group(1)), int(found.group(2) or 0)
    return second if first == 1 else first


def cache_dir(version: str = KAFKA_VERSION) -> Path:
    """Where the classpath of broker `version` is cached (outside the repository)."""
    root = os.environ.get("IOTFUSE_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "iotfuse"
    return base / f"kafka-{version}"


def cached_classpath(directory: Path | None = None) -> tuple[Path, ...] | None:
    """The cached classpath if it was resolved from the current pom and all jars exist."""
    directory = directory or cache_dir()
    cp_file, pom_copy = directory / "classpath.txt", directory / "pom.xml"
    if not (cp_file.is_file() and pom_copy.is_file()):
        return None
    if pom_copy.read_bytes() != _packaged_pom():
        return None  # the pom changed since: resolve again
    jars = tuple(Path(p) for p in cp_file.read_text().strip().split(os.pathsep) if p)
    if not jars or not all(j.is_file() for j in jars):
        return None
    return jars


def resolve_classpath(
    directory: Path | None = None, maven_repo: str | None = None
) -> tuple[Path, ...]:
    """The broker classpath: cached, or resolved by Maven (first run downloads ~60 MB)."""
    directory = directory or cache_dir()
    jars = cached_classpath(directory)
    if jars is not None:
        return jars
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be resolving right now
        jars = cached_classpath(directory)
        if jars is None:
            _run_maven(directory, maven_repo or os.environ.get("IOTFUSE_MAVEN_REPO"))
            jars = cached_classpath(directory)
    if jars is None:
        raise KafkaRuntimeError(
            f"Maven finished but the classpath in {directory} is unusable: delete that "
            "directory and try again"
        )
    return jars


def _packaged_pom() -> bytes:
    return resources.files(__package__).joinpath("pom.xml").read_bytes()


def _run_maven(directory: Path, maven_repo: str | None) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaRuntimeError(
            "Maven (mvn) is required once to download the local Kafka broker's jars: install "
            f"it (e.g. apt-get install maven) {_NO_BROKER_HINT}"
        )
    pom = _packaged_pom()
    tmp_pom, tmp_cp = directory / "pom.xml.tmp", directory / "classpath.txt.tmp"
    tmp_pom.write_bytes(pom)
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(tmp_pom),
        "dependency:build-classpath",
        f"-Dmdep.outputFile={tmp_cp}",
    ]
    if maven_repo:
        cmd.append(f"-Dmaven.repo.local={maven_repo}")
    log.info("resolving Apache Kafka %s jars with Maven (first run only)", KAFKA_VERSION)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=directory, timeout=900)
    tmp_pom.unlink(missing_ok=True)
    if done.returncode != 0 or not tmp_cp.is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
        raise KafkaRuntimeError(
            f"Maven could not resolve the Kafka {KAFKA_VERSION} jars (exit {done.returncode}); "
            f"check access to Maven Central or a mirror in ~/.m2/settings.xml. "
            f"Command: {' '.join(cmd)}\n{tail}"
        )
    # classpath first, then the pom it came from: a reader never pairs a new pom with a stale
    # classpath (cached_classpath compares the pom)
    tmp_cp.replace(directory / "classpath.txt")
    (directory / "pom.xml").write_bytes(pom)


def free_ports(host: str, count: int, exclude: set[int]) -> list[int]:
    """`count` distinct free TCP ports on `host` (all bound at once, then released)."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))
            if (port := int(sock.getsockname()[1])) not in exclude:
                ports.append(port)
    finally:
        for sock in socks:
            sock.close()
    return ports


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a text file ("" if it is missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 256 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
