"""A real single-node Kafka broker (KRaft, broker + controller) on 127.0.0.1, from Maven Central jars.

    python deploy/kafka/local_broker.py run [--port 9092]     # foreground; Ctrl-C stops it

The jars are fetched once with Maven into ``.kafka/lib`` (``deploy/kafka/pom.xml``); storage is
formatted in a fresh temporary directory each start. The test suite starts one per session.
Needs Java 17 and Maven on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LIB = ROOT / ".kafka" / "lib"


class BrokerError(RuntimeError):
    pass


def fetch_jars(lib: Path = LIB) -> Path:
    """Copy Kafka and its runtime dependencies into ``lib`` unless they are there already."""
    if any(lib.glob("kafka_2.13-*.jar")):
        return lib
    if not shutil.which("mvn"):
        raise BrokerError("Maven (mvn) is needed to fetch Kafka's jars: apt-get install maven")
    staging = lib.with_name(lib.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    subprocess.run(
        ["mvn", "-q", "-B", "-f", str(HERE / "pom.xml"), "dependency:copy-dependencies",
         f"-DoutputDirectory={staging}", "-DincludeScope=runtime"],
        check=True,
    )
    staging.rename(lib)  # a half-finished download never looks complete
    return lib


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


class LocalKafka:
    def __init__(self, port: int | None = None, workdir: Path | None = None, host: str = "127.0.0.1",
                 launcher: tuple[str, ...] = ()) -> None:
        """`host`: the address it listens on and advertises; `launcher`: a command prefix (`ip netns exec NAME`)."""
        self.port = port or free_port()
        self.host, self.launcher = host, launcher
        self.controller_port = free_port()
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="tuneloop-kafka-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def _write_config(self) -> Path:
        config = self.workdir / "server.properties"
        config.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@{self.host}:{self.controller_port}",
                    f"listeners=PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://{self.host}:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={self.workdir / 'data'}",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "min.insync.replicas=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=false",
                    "log.flush.interval.messages=1",  # fsync each message: acknowledged means on disk
                ]
            )
            + "\n"
        )
        (self.workdir / "log4j.properties").write_text(
            "log4j.rootLogger=WARN, file\n"
            "log4j.appender.file=org.apache.log4j.FileAppender\n"
            f"log4j.appender.file.File={self.workdir / 'broker.log'}\n"
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
        )
        return config

    def _java(self, *args: str) -> list[str]:
        java = shutil.which("java")
        if not java:
            raise BrokerError("Java 17 is needed for the Kafka broker: apt-get install openjdk-17-jre-headless")
        return [java, "-Xmx512m", f"-Dlog4j.configuration=file:{self.workdir / 'log4j.properties'}",
                "-cp", f"{fetch_jars()}/*", *args]

    def start(self, timeout: float = 90) -> LocalKafka:
        config = self._write_config()
        if not (self.workdir / "data" / "meta.properties").exists():
            subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "-t", str(uuid.uuid4()), "-c", str(config)),
                check=True,
                capture_output=True,
            )
        output = (self.workdir / "stdout.log").open("ab")
        self.process = subprocess.Popen(
            [*self.launcher, *self._java("kafka.Kafka", str(config))], stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.process.poll() is not None:
                raise BrokerError(f"Kafka exited with {self.process.returncode}; see {self.workdir}/stdout.log")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"Kafka did not answer on {self.bootstrap_servers} within {timeout} s")
            time.sleep(0.3)
        return self

    def _ready(self) -> bool:
        if not _answers(self.host, self.port):
            return False
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=3000)
        except KafkaError:
            return False
        try:
            admin.list_topics()
            return True
        except KafkaError:
            return False
        finally:
            admin.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no clean shutdown, data dir kept for a restart."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 30) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def running_kafka(port: int | None = None) -> Iterator[LocalKafka]:
    broker = LocalKafka(port).start()
    try:
        yield broker
    finally:
        broker.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["fetch", "run"])
    parser.add_argument("--port", type=int, default=9092)
    args = parser.parse_args()
    if args.command == "fetch":
        print(fetch_jars())
        return
    with running_kafka(args.port) as broker:
        print(f"Kafka on {broker.bootstrap_servers} (data in {broker.workdir}); Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
