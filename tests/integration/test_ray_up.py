"""`ray up ray_cluster.yaml`, `ray job submit`, `ray down` as the README's cluster section runs them, for real.

Ray's `local` provider stands in for the cloud: the head is this machine, reached over SSH (an sshd of the test's
own, on port 22 of a loopback address of its own, a host key and a client key made here) as a user the test makes.
Of ray_cluster.yaml the test swaps only what a cloud provides: `provider`, `auth`, the node types, the `docker`
section (no container runtime here), the setup commands (the head reuses this machine's virtual environment, put on
the user's PATH, instead of installing the project again: minutes) and the port numbers (free ones, so that it runs
beside other Ray clusters on the machine). `file_mounts` (the project and the laptop's token) and the start
commands run as written. The job is a short CPU run of the default config with `storage.path` set.

The user is unprivileged on purpose: the start commands' and `ray down`'s `ray stop` end every Ray process their
user may signal, which for this user are only the test's own.
"""

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(shutil.which("ray") or "ray").parent
SHORT = [
    "learner.sft_steps=6",
    "learner.sft_eval_every=3",
    "learner.minillm_steps=3",
    "eval.every_steps=3",
    "eval.num_prompts=8",
    "eval.kl_prompts=8",
    "data.max_valid_examples=60",
    "models.tiny.teacher_train_steps=20",  # the job builds its own models (a private cache): quality is no concern
]
# ray_cluster.yaml's head ports (Ray's defaults, stated there) -> free ones here
HEAD_PORTS = {"port": 6379, "dashboard-port": 8265, "metrics-export-port": 8080, "dashboard-agent-listen-port": 52365}
HEAD_PORTS["ray-client-server-port"] = 10001


def _why_no_sshd() -> str | None:
    if os.geteuid() != 0:
        return "needs root: it makes a user and runs sshd as root (privilege separation)"
    for tool in ("/usr/sbin/sshd", "rsync", "ssh", "ssh-keygen", "useradd", "userdel"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install openssh-server rsync)"
    return None


def _loopback_with_free_ssh_port() -> str | None:
    """A 127.x.y.z of our own whose port 22 is free (ssh through Ray's launcher has no port option)."""
    for i in range(20):
        ip = f"127.{(os.getpid() >> 8) % 250 + 1}.{(os.getpid() + i) % 250 + 1}.{i + 2}"
        with socket.socket() as s:
            try:
                s.bind((ip, 22))
            except OSError:
                continue
            return ip
    return None


def _world_reachable(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents])


def _node_python() -> Path | None:
    """A Python 3.11 the test's user may run: this venv's own interpreter, or (where that lives under a folder
    other users cannot enter, e.g. /root/.pyenv) the system's python3.11."""
    real = Path(os.path.realpath(sys.executable))
    if _world_reachable(real.parent):
        return real
    system = Path("/usr/bin/python3.11")
    return system if system.is_file() and _world_reachable(system.parent) else None


def _node_venv(base: Path, python: Path) -> Path:
    """The node's environment: a virtual environment over this machine's installed packages (a .pth adds this
    venv's site-packages, editable install included), instead of setup commands installing the project again."""
    venv = base / "venv"
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*")) / "site-packages"
    (site / "minillm_machine_env.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
    )
    ray = venv / "bin" / "ray"
    ray.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n")
    ray.chmod(0o755)
    return venv / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str], timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        what = f"{' '.join(cmd[:4])} failed ({proc.returncode})"
        raise AssertionError(f"{what}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _swap_ports(command: str, ports: dict[str, int]) -> str:
    for flag, default in HEAD_PORTS.items():
        pattern = rf"--{flag}=({default})\b"
        assert re.search(pattern, command), f"ray_cluster.yaml's head start command lost --{flag}={default}"
        command = re.sub(pattern, f"--{flag}={ports[flag]}", command)
    return command


def _test_cluster_config(base: Path, user: str, ip: str, key: Path, ports: dict[str, int]) -> dict:
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    cfg["cluster_name"] = f"minillm-e2e-{os.getpid()}"
    cfg["provider"] = {"type": "local", "head_ip": ip, "worker_ips": []}
    cfg["auth"] = {"ssh_user": user, "ssh_private_key": str(key)}
    del cfg["available_node_types"], cfg["head_node_type"]  # the local provider makes its own single node type
    cfg["max_workers"] = 0
    cfg.pop("docker", None)
    # the machine's environment instead of installing the project again; show which Python and Ray the head has
    cfg["setup_commands"] = []
    cfg["head_setup_commands"] = ["python -c 'import sys, ray, vllm; print(sys.version.split()[0], ray.__version__)'"]
    cfg["worker_setup_commands"] = []
    starts = cfg["head_start_ray_commands"]
    assert sum("ray start" in c for c in starts) == 1, starts
    cfg["head_start_ray_commands"] = [_swap_ports(c, ports) if "ray start" in c else c for c in starts]
    return cfg


def _stop_user_processes(user: str) -> None:
    procs = []
    for proc in psutil.process_iter(["username"]):
        if proc.info["username"] == user:
            procs.append(proc)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def ssh_head():
    why = _why_no_sshd()
    if why:
        pytest.skip(f"ray up over SSH to this machine: {why}")
    ip = _loopback_with_free_ssh_port()
    if ip is None:
        pytest.skip("no loopback address with a free port 22 for the test's sshd")
    python = _node_python()
    if python is None:
        pytest.skip("no Python 3.11 that an unprivileged user may run (this venv's lives in a private folder)")
    base = Path(tempfile.mkdtemp(prefix="rayup", dir="/tmp"))  # short: Ray's socket paths live under it
    base.chmod(0o755)
    user = f"mlup{os.getpid()}"
    home, laptop, sshd_dir = base / "home", base / "laptop", base / "sshd"
    for d in (home, laptop, sshd_dir):
        d.mkdir()
    # "*": no password, but not locked (sshd refuses a locked account even for a key)
    subprocess.run(["useradd", "-M", "-d", str(home), "-s", "/bin/bash", "-p", "*", user], check=True)
    sshd = None
    try:
        uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
        key = laptop / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sshd_dir / "host_key")], check=True)
        (sshd_dir / "authorized_keys").write_text((laptop / "id_ed25519.pub").read_text())
        (sshd_dir / "authorized_keys").chmod(0o644)
        options = {
            "ListenAddress": f"{ip}:22",
            "HostKey": sshd_dir / "host_key",
            "AuthorizedKeysFile": sshd_dir / "authorized_keys",
            "PidFile": sshd_dir / "sshd.pid",
            "AllowUsers": user,
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "UsePAM": "no",
            "StrictModes": "no",  # the key files sit in the test's temporary folder
            "AllowTcpForwarding": "yes",  # ray dashboard's tunnel
            "MaxStartups": 50,
            "MaxSessions": 50,
        }
        (sshd_dir / "sshd_config").write_text("".join(f"{k} {v}\n" for k, v in options.items()))
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        sshd = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(sshd_dir / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=open(sshd_dir / "sshd.log", "w"),
        )
        for _ in range(50):
            with socket.socket() as s:
                if s.connect_ex((ip, 22)) == 0:
                    break
            time.sleep(0.1)
        else:
            pytest.skip(f"sshd did not start: {(sshd_dir / 'sshd.log').read_text()[-500:]}")
        # the node's environment: this machine's venv on PATH (instead of setup commands installing the project),
        # Ray's temp folder of its own
        (home / ".bashrc").write_text(
            f"export PATH={_node_venv(base, python)}:$PATH RAY_TMPDIR={base / 'rt'}\n"
            "export VLLM_ENABLE_V1_MULTIPROCESSING=0 WANDB_MODE=offline\n"
        )
        (base / "rt").mkdir()
        (base / "store").mkdir()
        (base / "tiny-cache").mkdir()  # the job builds the default's models here, on the "cluster"
        for path in (home, home / ".bashrc", base / "rt", base / "store", base / "tiny-cache"):
            os.chown(path, uid, gid)
        yield {"base": base, "user": user, "ip": ip, "key": key, "laptop": laptop, "cache": base / "tiny-cache"}
    finally:
        _stop_user_processes(user)
        if sshd is not None:
            sshd.terminate()
            sshd.wait(timeout=15)
        subprocess.run(["userdel", user], check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_ray_up_job_submit_ray_down(ssh_head):
    base, user, ip = ssh_head["base"], ssh_head["user"], ssh_head["ip"]
    ports = {flag: _free_port() for flag in HEAD_PORTS}
    cfg = _test_cluster_config(base, user, ip, ssh_head["key"], ports)
    config = base / "cluster.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # the laptop: a home of its own (its ~/.ray/auth_token), no RAY_ADDRESS of the machine's clusters
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update({"HOME": str(ssh_head["laptop"]), "PATH": f"{VENV_BIN}:{env.get('PATH', '')}"})
    env["RAY_TMPDIR"] = str(ssh_head["laptop"])  # the local provider's cluster-state file, not in /tmp/ray
    _run(["ray", "get-auth-token", "--generate"], env, 60)
    token = (ssh_head["laptop"] / ".ray" / "auth_token").read_text().strip()
    forward = None
    try:
        up = _run(["ray", "up", "-y", "--no-config-cache", str(config)], env, 600)
        assert "3.11" in up.stdout + up.stderr  # the head's setup command printed its Python
        # the README's two ways to bring the head's token to a laptop, as written there
        read = f"ray exec {config} 'ray get-auth-token' 2>/dev/null | grep -oE '[0-9a-f]{{64}}' | tail -n 1"
        head_token = _run(["bash", "-c", read], env, 120)
        assert head_token.stdout.strip() == token, head_token.stdout[-2000:]
        copy = ssh_head["laptop"] / "head_token"
        _run(["ray", "rsync-down", str(config), "~/.ray/auth_token", str(copy)], env, 120)
        assert copy.read_text().strip() == token
        local = _free_port()
        forward = subprocess.Popen(
            ["ray", "dashboard", str(config), "--port", str(local), "--remote-port", str(ports["dashboard-port"])],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", local)) == 0:
                    break
            time.sleep(0.3)
        store = base / "store" / "tiny"
        job_env = dict(env, RAY_AUTH_MODE="token")
        submit = _run(
            ["ray", "job", "submit", "--address", f"http://127.0.0.1:{local}", "--working-dir", ".", "--"]
            + ["python", "-m", "learner.main", "--config", "configs/tiny.yaml", f"storage.path={store}"]
            + [f"models.tiny.cache_dir={ssh_head['cache']}", *SHORT],
            job_env,
            900,
            check=False,
        )
        logs = submit.stdout + submit.stderr
        assert submit.returncode == 0 and "succeeded" in logs, logs[-5000:]
        assert "[minillm] step 3/3" in logs
        assert (store / "summary.json").is_file() and (store / "checkpoints" / "final" / "config.json").is_file()
        assert pwd.getpwuid((store / "summary.json").stat().st_uid).pw_name == user  # written on the "cluster"
    finally:
        if forward is not None:
            forward.terminate()
            forward.wait(timeout=15)
        down = _run(["ray", "down", "-y", str(config)], env, 300, check=False)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    # ray down stopped the head: none of the user's Ray processes is left
    time.sleep(2)
    left = [p.info["cmdline"] for p in psutil.process_iter(["username", "cmdline"]) if p.info["username"] == user]
    assert not [c for c in left if c and any("ray" in part for part in c)], left
