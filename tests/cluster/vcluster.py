"""A small real cluster on one Linux machine: hosts as network namespaces, SLURM and munge running on them.

Each host is a network namespace (its own `eth0`, address, routes and ports) joined to the others by a bridge that
lives in a namespace of its own, plus a UTS namespace (its own hostname) and a mount namespace whose only change is
its /etc/hosts (every host's name and address). The last two belong to the host's anchor process (a `sleep`): a
command runs on the host by entering the anchor's namespaces (`nsenter -t`), and killing every process of the host
kills them too, so a host brought back (`boot`) starts with fresh ones, as after a reboot. Unlike ``ip netns
exec``, entering them keeps /sys/fs/cgroup, which slurmd needs. The machine's own network namespace is not touched:
no interface, route or daemon is added to it, and nothing a test does can reach beyond the bridge.

    munged                  in the bridge's namespace; every host reaches it through its socket file
    slurmctld               on host 0 (the first address), with state, spool, logs under the cluster's folder
    slurmd                  one per host, ``-N <hostname>``, killed with the host by `kill_host`

Everything is removed by `down` (also called when `up` fails half-way, and at interpreter exit): processes in the
namespaces, the namespaces (logs stay in the cluster's folder). `down` is idempotent and never
raises, so a failing test cannot leave a bridge or a daemon behind.

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN), `ip`, `nsenter`, `unshare`, and slurm-wlm + munge (+ openmpi-bin for
mpirun). `missing()` says what is absent, so that a test can skip with the reason instead of failing or hanging.

Also a command line, for looking around by hand:
    python tests/cluster/vcluster.py up --hosts 2 --dir /tmp/vc      # prints the commands to enter each host
    python tests/cluster/vcluster.py down --dir /tmp/vc
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RSH_AGENT = HERE / "netns-rsh"  # Open MPI's remote-shell agent: enters the named host's namespaces
SUBNET = "10.231.0"  # inside the cluster's own bridge: never routed anywhere else
PROGRAMS = {"ip": "iproute2", "nsenter": "util-linux", "unshare": "util-linux", "munged": "munge",
            "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm"}


def missing(mpi: bool = False) -> str | None:
    """Why a cluster cannot start here (None when it can): not root, or a program not installed."""
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (network namespaces, slurmd): run as root, or in CI"
    programs = dict(PROGRAMS, **({"mpirun": "openmpi-bin"} if mpi else {}))
    absent = sorted({pkg for prog, pkg in programs.items() if shutil.which(prog) is None})
    if absent:
        return f"needs the Debian packages {' '.join(absent)}: apt-get install -y {' '.join(absent)}"
    probe = f"bbjc-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here ({made.stderr.strip()}): a container without CAP_SYS_ADMIN?"
    return None


def _sh(*argv: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
    return done


def reap_stale() -> list[str]:
    """Remove the namespaces (and what runs in them) of clusters whose creating process is gone: a test run killed
    with SIGKILL (a CI timeout) never reached `down`. Returns the namespaces removed."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    removed = []
    for name in listed:
        parts = name.split("-")  # bbjc-<pid>-<random>-<host or sw>
        if len(parts) < 4 or parts[0] != "bbjc" or not parts[1].isdigit() or os.path.exists(f"/proc/{parts[1]}"):
            continue
        VirtualCluster._kill_namespace(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        removed.append(name)
    return removed


class VirtualCluster:
    """``hosts`` namespace hosts named ``bbjn0..`` at 10.231.0.1.., SLURM partition ``bbj`` over all of them.

    Each host offers ``cpus`` CPUs and ``gpus`` stand-in GPUs (generic resources whose "device files" are empty
    files), so that a job script asking for --gpus-per-node is scheduled as written; nothing uses them."""

    def __init__(self, root: Path, hosts: int = 2, cpus: int = 2, gpus: int = 2, slurmd_timeout: int = 10,
                 cred_expire: int = 10):
        self.root = Path(root).resolve()
        # namespaces are global names: two clusters at once must not collide; the pid lets `reap_stale` find
        # the clusters of a process that was SIGKILLed before it could call `down`
        self.tag = f"{os.getpid()}-{secrets.token_hex(2)}"
        self.names = [f"bbjn{i}" for i in range(hosts)]
        self.addr = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(self.names)}
        self.cpus, self.gpus, self.slurmd_timeout, self.cred_expire = cpus, gpus, slurmd_timeout, cred_expire
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.daemons: dict[str, subprocess.Popen] = {}

    # --- names ----------------------------------------------------------------------------------------------------
    def netns(self, host: str) -> str:
        return f"bbjc-{self.tag}-{host}"

    @property
    def switch(self) -> str:
        return f"bbjc-{self.tag}-sw"

    def anchor(self, host: str) -> int:
        """The pid whose UTS and mount namespaces are the host's (written by `boot`, read by netns-rsh too)."""
        return int((self.root / f"host-{host}.pid").read_text())

    def env(self) -> dict:
        """What commands on the hosts need: the SLURM config, the rsh agent's key to the namespaces, mpirun as root."""
        return {"SLURM_CONF": str(self.conf), "BBJ_CLUSTER_DIR": str(self.root),
                "OMPI_MCA_plm_rsh_agent": str(RSH_AGENT),
                "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                # Open MPI's own traffic over the cluster network, not lo (which every namespace has)
                "OMPI_MCA_oob_tcp_if_include": f"{SUBNET}.0/24", "OMPI_MCA_btl_tcp_if_include": f"{SUBNET}.0/24"}

    def on(self, host: str, argv: list[str], cwd: Path | None = None) -> list[str]:
        """``argv`` as run on ``host`` (in ``cwd``): its network namespace, its hostname, its /etc/hosts."""
        return ["nsenter", "-t", str(self.anchor(host)), "--net", "--uts", "--mount", f"--wd={cwd or self.root}",
                "--", *argv]

    # --- life cycle -----------------------------------------------------------------------------------------------
    def up(self, timeout: float = 60) -> "VirtualCluster":
        reap_stale()
        atexit.register(self.down)
        try:
            self._network()
            self._munge()
            self._slurm_config()
            self._start_slurmctld()
            for host in self.names:
                self.start_slurmd(host)
            self.wait_nodes("idle", self.names, timeout)
        except BaseException:
            self.down()
            raise
        return self

    def _network(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _sh("ip", "netns", "add", self.switch)
        _sh("ip", "netns", "exec", self.switch, "ip", "link", "add", "br0", "type", "bridge")
        _sh("ip", "netns", "exec", self.switch, "ip", "link", "set", "br0", "up")
        (self.root / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in self.addr.items()))
        for i, host in enumerate(self.names):
            ns = self.netns(host)
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", f"v{i}", "netns", self.switch, "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _sh("ip", "netns", "exec", self.switch, "ip", "link", "set", f"v{i}", "master", "br0", "up")
            for cmd in (["ip", "addr", "add", f"{self.addr[host]}/24", "dev", "eth0"],
                        ["ip", "link", "set", "eth0", "up"], ["ip", "link", "set", "lo", "up"]):
                _sh("ip", "netns", "exec", ns, *cmd)
            (self.root / "spool" / host).mkdir(parents=True, exist_ok=True)
            self.boot(host)

    def boot(self, host: str, timeout: float = 10) -> None:
        """Start the host's anchor: new UTS and mount namespaces inside its network namespace, its hostname set and
        the cluster's hosts file over /etc/hosts, then `sleep` holding them (nsenter and unshare exec, one pid)."""
        anchor = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns(host)}", "unshare", "--uts", "--mount", "--propagation",
             "private", "sh", "-c", f"hostname {host} && mount --bind {self.root / 'hosts'} /etc/hosts && "
                                    f"exec sleep infinity"], start_new_session=True)
        self.daemons[f"anchor-{host}"] = anchor
        deadline = time.monotonic() + timeout
        while not os.path.realpath(f"/proc/{anchor.pid}/exe").endswith("sleep"):
            if anchor.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host {host}: its namespaces could not be made (exit status {anchor.poll()})")
            time.sleep(0.02)
        (self.root / f"host-{host}.pid").write_text(f"{anchor.pid}\n")

    def _munge(self) -> None:
        folder = self.munge_socket.parent
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        key = folder / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        _sh("ip", "netns", "exec", self.switch, "munged", "--force", f"--socket={self.munge_socket}",
            f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}", f"--log-file={folder / 'munged.log'}",
            f"--seed-file={folder / 'munged.seed'}")

    def _slurm_config(self) -> None:
        for sub in ("ctld", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        head = self.names[0]
        nodes = "".join(f"NodeName={h} NodeAddr={a} CPUs={self.cpus} RealMemory=1000 Gres=gpu:{self.gpus} "
                        f"State=UNKNOWN\n" for h, a in self.addr.items())
        self.conf.write_text(f"""\
ClusterName=bbj{self.tag}
SlurmctldHost={head}({self.addr[head]})
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (SLURM's default: 120 s)
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={self.root}/ctld
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
# a node that stops answering is DOWN after SlurmdTimeout; it comes back by itself when its slurmd registers again
SlurmdTimeout={self.slurmd_timeout}
SlurmctldTimeout=10
ReturnToService=2
KillWait=5
MinJobAge=600
JobRequeue=1
InactiveLimit=0
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
GresTypes=gpu
{nodes}PartitionName=bbj Nodes=ALL Default=YES MaxTime=60 State=UP
""")
        # slurmd counts GPUs by their device files: plain files stand in (nothing opens them; no cgroup constraint)
        (self.root / "dev").mkdir(exist_ok=True)
        for i in range(self.gpus):
            (self.root / "dev" / f"gpu{i}").touch()
        (self.root / "gres.conf").write_text(f"Name=gpu File={self.root}/dev/gpu[0-{self.gpus - 1}]\n")

    def _daemon(self, name: str, host: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.daemons[name] = subprocess.Popen(self.on(host, argv), stdout=log, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True)

    def _start_slurmctld(self) -> None:
        self._daemon("slurmctld", self.names[0], ["slurmctld", "-D", "-i", "-f", str(self.conf)])

    def start_slurmd(self, host: str) -> None:
        """(Re)start ``host``'s slurmd (and the host, if it was lost): a rebooted node rejoins (ReturnToService=2)."""
        if self.daemons[f"anchor-{host}"].poll() is not None:
            self.boot(host)
        self._daemon(f"slurmd-{host}", host, ["slurmd", "-D", "-N", host, "-f", str(self.conf)])

    def down(self) -> None:
        """Remove everything `up` made, whatever state it is in. Never raises."""
        for host in self.names:
            self._kill_namespace(self.netns(host))
        self._kill_namespace(self.switch)  # munged
        for proc in self.daemons.values():
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for host in self.names:
            subprocess.run(["ip", "netns", "del", self.netns(host)], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)

    @staticmethod
    def _kill_namespace(netns: str) -> list[int]:
        pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", netns], capture_output=True,
                                               text=True).stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return pids

    # --- faults ---------------------------------------------------------------------------------------------------
    def kill_host(self, host: str) -> list[int]:
        """The host loses power: every process on it (slurmd, slurmstepd, the ranks) SIGKILLed at once."""
        return self._kill_namespace(self.netns(host))

    def link(self, host: str, up: bool) -> None:
        """Take the host's cable out (or put it back): its end of the link seen from the bridge goes down."""
        i = self.names.index(host)
        _sh("ip", "netns", "exec", self.switch, "ip", "link", "set", f"v{i}", "up" if up else "down")

    def slow(self, host: str, delay_ms: int = 2000, rate: str = "50kbit") -> str:
        """Slow the host's link both ways (its eth0 and its port on the bridge): ``delay_ms`` of latency with tc
        netem; where the kernel has no netem (CONFIG_NET_SCH_NETEM), a ``rate`` bandwidth limit with tc tbf
        instead. Returns what was applied."""
        i = self.names.index(host)
        sides = [("ip", "netns", "exec", self.netns(host), "tc", "qdisc", "replace", "dev", "eth0", "root"),
                 ("ip", "netns", "exec", self.switch, "tc", "qdisc", "replace", "dev", f"v{i}", "root")]
        if _sh(*sides[0], "netem", "delay", f"{delay_ms}ms", check=False).returncode == 0:
            _sh(*sides[1], "netem", "delay", f"{delay_ms}ms")
            return f"netem delay {delay_ms}ms each way"
        for side in sides:
            _sh(*side, "tbf", "rate", rate, "burst", "16kbit", "latency", "30s")
        return f"tbf rate {rate} each way (no netem in this kernel)"

    def unslow(self, host: str) -> None:
        i = self.names.index(host)
        _sh("ip", "netns", "exec", self.netns(host), "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
        _sh("ip", "netns", "exec", self.switch, "tc", "qdisc", "del", "dev", f"v{i}", "root", check=False)

    # --- SLURM --------------------------------------------------------------------------------------------------------
    def run(self, host: str, argv: list[str], timeout: float = 30, check: bool = True, env: dict | None = None,
            cwd: Path | None = None) -> str:
        done = subprocess.run(self.on(host, argv, cwd), capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ if env is None else env, **self.env()))
        if check and done.returncode != 0:
            raise RuntimeError(f"on {host}: {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def node_states(self) -> dict[str, str]:
        out = self.run(self.names[0], ["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)

    def wait_nodes(self, state: str, hosts: list[str], timeout: float) -> float:
        """Seconds until every host in ``hosts`` is in ``state`` (sinfo's words: idle, down, ...)."""
        start = time.monotonic()
        while True:
            try:
                states = self.node_states()
            except (subprocess.TimeoutExpired, RuntimeError):
                states = {}
            if all(states.get(h, "").rstrip("*~#") == state for h in hosts):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                logs = "".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in (self.root / "log").glob("*"))
                raise TimeoutError(f"nodes {hosts} not {state} after {timeout:.0f} s: {states}\n{logs}")
            time.sleep(0.5)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, NodeList, ...)."""
        out = self.run(self.names[0], ["scontrol", "-o", "show", "job", job_id], check=False)
        return dict(f.split("=", 1) for f in out.split() if "=" in f)


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    state = args.dir / "cluster.json"
    if args.action == "up":
        reason = missing(mpi=True)
        if reason:
            sys.exit(f"cannot start a cluster: {reason}")
        cluster = VirtualCluster(args.dir, args.hosts)
        cluster.tag = f"cli-{secrets.token_hex(2)}"  # it outlives this command: never reaped as stale
        cluster.up()
        atexit.unregister(cluster.down)  # it outlives this command; `down` removes it
        state.write_text(json.dumps({"tag": cluster.tag, "hosts": args.hosts}))
        for host in cluster.names:
            print(f"{host}: SLURM_CONF={cluster.conf} {' '.join(cluster.on(host, ['bash']))}")
    else:
        saved = json.loads(state.read_text())
        cluster = VirtualCluster(args.dir, saved["hosts"])
        cluster.tag = saved["tag"]
        cluster.down()
        state.unlink()
        print(f"removed cluster {cluster.tag} (its logs stay under {args.dir})")


if __name__ == "__main__":
    _main()
