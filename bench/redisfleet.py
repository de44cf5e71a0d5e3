"""Real Redis fleets on 127.0.0.1 for the chaos soak and the store tests: one redis-server, a
Sentinel group (a master, replicas, three sentinels) and a Redis Cluster, all `redis-server`
processes in a work folder on free ports, no persistence.

    fleet = SentinelFleet(workdir); fleet.start()      # fleet.url: redis+sentinel://.../lstm/0
    old = fleet.kill_master()                          # SIGKILL; sentinels promote the replica
    fleet.restart_as_replica(old)                      # back, as a replica of the new master
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from bench.procs import HOST, free_port

MASTER_NAME = "lstm"
# A master starts a replica's full sync at once (Redis waits 5 s by default for more replicas):
# a restarted node is empty, and unable to acknowledge a save, for milliseconds instead.
SYNC_AT_ONCE = ("--repl-diskless-sync-delay", "0")


def _binary(name: str = "redis-server") -> str:
    binary = shutil.which(name)
    if binary is None:
        raise RuntimeError(f"{name} is not installed (apt-get install redis-server)")
    return binary


class RedisNode:
    """One redis-server (or sentinel) process on a fixed port; can be killed and started again."""

    def __init__(self, workdir: Path, name: str, port: int | None = None) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = port or free_port()
        self.popen: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []
        self.ssl_ca: str | None = None  # a TLS-only node: its CA file, for wait_ready

    def argv(self) -> list[str]:
        return [_binary(), "--port", str(self.port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), *self.extra]  # fmt: skip

    def start(self, *extra: str) -> RedisNode:
        if extra:
            self.extra = list(extra)
        log = open(self.dir / "log.txt", "ab")  # noqa: SIM115
        self.popen = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.wait_ready()
        return self

    def client(self, timeout: float = 1.0) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": self.ssl_ca} if self.ssl_ca else {}
        return redis.Redis(
            HOST, self.port, socket_timeout=timeout, socket_connect_timeout=timeout, **tls
        )

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with self.client() as c:
                    c.ping()
                return
            except (redis.ResponseError, redis.AuthenticationError):  # it answers: up
                return
            except redis.RedisError:
                if time.monotonic() > deadline or (self.popen and self.popen.poll() is not None):
                    raise RuntimeError(f"{self.name} did not start; see {self.dir}") from None
                time.sleep(0.02)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)
            self.popen.wait(10)

    def stop(self) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


class SentinelNode(RedisNode):
    """A sentinel watching MASTER_NAME (quorum 2), quick to call a master down."""

    def __init__(self, workdir: Path, name: str, master_port: int, down_after_ms: int) -> None:
        super().__init__(workdir, name)
        self.conf = self.dir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind {HOST}\ndir {self.dir}\n"
            f"sentinel monitor {MASTER_NAME} {HOST} {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
            f"sentinel failover-timeout {MASTER_NAME} {max(3000, 3 * down_after_ms)}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )

    def argv(self) -> list[str]:
        return [_binary(), str(self.conf), "--sentinel"]


class SentinelFleet:
    """A master, `replicas` replicas and three sentinels. `down_after_ms` 2000: a sentinel pings
    every second, so with 1000 one late reply (a loaded machine, or the first ping to a master
    just promoted) calls a master down and can start a second failover, leaving the first
    promoted node a master without replicas until the sentinels demote it (~10 s)."""

    def __init__(self, workdir: Path, replicas: int = 1, down_after_ms: int = 2000) -> None:
        self.workdir = workdir
        self.nodes = [RedisNode(workdir, f"redis{i}") for i in range(1 + replicas)]
        master = self.nodes[0].port
        self.sentinels = [
            SentinelNode(workdir, f"sentinel{i}", master, down_after_ms) for i in range(3)
        ]
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        self.url = f"redis+sentinel://{hosts}/{MASTER_NAME}/0"
        self.failovers = 0

    def start(self) -> SentinelFleet:
        self.nodes[0].start(*SYNC_AT_ONCE)
        for node in self.nodes[1:]:
            node.start(*SYNC_AT_ONCE, "--replicaof", HOST, str(self.nodes[0].port))
        self.wait_synced()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_sentinels_see(len(self.nodes) - 1)
        return self

    def master_port(self) -> int:
        """The master the sentinels name now."""
        for sentinel in self.sentinels:
            if not sentinel.alive():
                continue
            try:
                with sentinel.client() as c:
                    _, port = c.execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
                return int(port)
            except redis.RedisError:
                continue
        raise RuntimeError("no sentinel answers")

    def master(self) -> RedisNode:
        port = self.master_port()
        return next(n for n in self.nodes if n.port == port)

    def wait_synced(self, timeout_s: float = 20.0) -> None:
        """Until every live replica of the current master is online and acknowledging."""
        deadline = time.monotonic() + timeout_s
        master = self.nodes[0] if not self.sentinels[0].alive() else self.master()
        want = sum(1 for n in self.nodes if n.alive() and n is not master)
        while time.monotonic() < deadline:
            with master.client() as c:
                info = c.info("replication")
            online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            synced = [v for v in online if v.get("state") == "online" and int(v["lag"]) <= 1]
            if len(synced) >= want:  # online and acknowledging (under writes, never "equal")
                return
            time.sleep(0.05)
        raise RuntimeError("replicas did not catch up")

    def wait_sentinels_see(self, replicas: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            seen = []
            for sentinel in self.sentinels:
                with sentinel.client() as c:
                    try:
                        info = c.sentinel_slaves(MASTER_NAME)
                        sentinels = c.sentinel_sentinels(MASTER_NAME)
                    except redis.RedisError:
                        info, sentinels = [], []
                up = [r for r in info if not r.get("is_sdown") and not r.get("is_odown")]
                seen.append(len(up) >= replicas and len(sentinels) >= len(self.sentinels) - 1)
            if all(seen):
                return
            time.sleep(0.1)
        raise RuntimeError("the sentinels do not see the whole group")

    def kill_master(self) -> RedisNode:
        """SIGKILL the current master; returns it (dead)."""
        master = self.master()
        master.kill()
        return master

    def wait_failover(self, old_port: int, timeout_s: float = 30.0) -> int:
        """Until the sentinels name another master than `old_port`; its port."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                port = self.master_port()
                if port != old_port:
                    self.failovers += 1
                    return port
            time.sleep(0.05)
        raise RuntimeError(f"no failover away from {old_port} within {timeout_s} s")

    def restart_as_replica(self, node: RedisNode) -> None:
        """Start a killed node again as a replica of the current master (never as a master:
        empty, it would wipe the group); waits until it has caught up. Until then it cannot be
        promoted (replica-priority 0): a failover to it while still empty would lose everything."""
        master = self.master_port()
        node.start(*SYNC_AT_ONCE, "--replica-priority", "0", "--replicaof", HOST, str(master))
        self.wait_synced()
        with node.client() as c:
            c.config_set("replica-priority", 100)

    def switches(self) -> list[str]:
        """The failovers as the sentinels logged them (`+switch-master`, one line each per
        sentinel), with the down and promotion events around them: the story of a failed test."""
        events = ("+switch-master", "+sdown master", "+odown master", "+promoted-slave")
        lines = []
        for sentinel in self.sentinels:
            log = sentinel.dir / "log.txt"
            text = log.read_text(errors="replace") if log.exists() else ""
            lines += [f"{sentinel.name}: {line}" for line in text.splitlines()
                      if any(e in line for e in events)]  # fmt: skip
        return lines

    def stop(self) -> None:
        for node in [*self.sentinels, *self.nodes]:
            node.stop()


class ClusterFleet:
    """A Redis Cluster of `masters` masters (no replicas) on loopback."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes = [RedisNode(workdir, f"cluster{i}") for i in range(masters)]
        self.url = "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes)

    def start(self) -> ClusterFleet:
        for node in self.nodes:
            node.start(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node.dir / "nodes.conf"),
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                str(free_port()),
            )  # fmt: skip (the bus: any free port)
        addresses = [f"{HOST}:{n.port}" for n in self.nodes]
        subprocess.run(
            [_binary("redis-cli"), "--cluster", "create", *addresses, "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with self.nodes[0].client() as c:
                if c.execute_command("CLUSTER", "INFO").decode().find("cluster_state:ok") >= 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
