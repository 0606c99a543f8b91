#!/usr/bin/env python3
"""walsync vs Litestream, measured in the same run on this machine. Run through scripts/bench.sh,
which builds what this needs and passes the paths.

Everything talks to one S3 server on 127.0.0.1 (testkit/src/bin/s3-server.rs: s3s-fs with SigV4,
and a log line per request). Phases run one tool at a time, except the idle window, where both
tools sit idle side by side and requests are told apart by their key prefix. After each phase
its objects are removed from the server's directory: s3s-fs walks the whole bucket on every
LIST, so leftovers would slow the next phase.

Only the Python standard library is used (sqlite3 for the databases).
"""

import argparse
import gzip
import json
import math
import os
import platform
import random
import re
import select
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import zlib

KIB = 1024
MIB = 1024 * 1024


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Processes: every child is recorded in a pid file, so bench.sh's EXIT trap can end what a
# crashed or killed run left behind (by pid, checking the command line first).


class Children:
    def __init__(self, pidfile):
        self.pidfile = pidfile
        self.live = []

    def start(self, cmd, *, env=None, stdout=None, stderr=None, cwd=None):
        proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, cwd=cwd,
                                stdin=subprocess.DEVNULL)
        with open(self.pidfile, "a") as f:
            f.write(f"{proc.pid} {cmd[0]}\n")
        self.live.append(proc)
        return proc

    def stop(self, proc, timeout=30.0, sig=signal.SIGTERM):
        """Signal `proc` (if still running) and reap it with wait4. Returns its exit code,
        peak RSS, CPU seconds, and whether it had to be killed.

        Peak RSS is the process's own VmHWM, sampled every few milliseconds until it exits,
        so it includes the shutdown. Not ru_maxrss from wait4: Python starts children with
        vfork, and Linux then carries Python's own resident size (about 19 MiB) into the
        child's ru_maxrss at exec, which would hide any tool smaller than that."""
        gone = {"rc": proc.returncode, "maxrss_kib": None, "cpu_s": None, "killed": False}
        if proc.returncode is not None:  # already reaped (by Popen.poll): no usage to read
            return gone
        # os.kill, not proc.send_signal: that polls first and could reap the child itself.
        # The child is not reaped yet, so its pid is still its own.
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        killed = False
        peak = 0
        while True:
            peak = max(peak, vm_hwm_kib(proc.pid) or 0)
            try:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            except ChildProcessError:  # reaped behind our back
                proc.returncode = proc.returncode if proc.returncode is not None else -1
                gone["rc"] = proc.returncode
                return gone
            if pid:
                break
            if time.monotonic() > deadline and not killed:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.002)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc in self.live:
            self.live.remove(proc)
        return {
            "rc": proc.returncode,
            "maxrss_kib": peak or None,
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "killed": killed,
        }

    def stop_all(self):
        for proc in list(self.live):
            try:
                self.stop(proc, timeout=5)
            except Exception as e:  # noqa: BLE001 - best effort at exit
                log(f"stopping {proc.args[0]}: {e}")


def proc_status_kib(pid, field):
    """A KiB field of a running process's /proc status (None if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def vm_hwm_kib(pid):
    """VmHWM (peak resident) of a running process, KiB (None if gone)."""
    return proc_status_kib(pid, "VmHWM")


def vm_rss_kib(pid):
    """VmRSS (resident now) of a running process, KiB (None if gone)."""
    return proc_status_kib(pid, "VmRSS")


def cpu_seconds_of(pid):
    """User + system CPU time of a running process so far, s (None if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads_of(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def open_files_of(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def run_timed(cmd, env, out_path):
    """Run a short command under /usr/bin/time -v: exit code, peak RSS KiB, wall seconds."""
    time_out = out_path + ".time"
    start = time.monotonic()
    with open(out_path, "w") as out:
        rc = subprocess.call(["/usr/bin/time", "-v", "-o", time_out, *cmd], env=env,
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    wall = time.monotonic() - start
    text = open(time_out).read()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"rc": rc, "maxrss_kib": int(m.group(1)) if m else None, "wall_s": round(wall, 3)}


# ---------------------------------------------------------------------------------------------
# The S3 server and what it saw.


class Server:
    """One s3-server process. With `latency_ms`, its endpoint is a proxy in front of it that
    holds every request that long (see testkit/src/bin/s3-server.rs); `name` keeps a second
    server's files apart from the first one's."""

    def __init__(self, children, exe, work, name="s3", latency_ms=0):
        self.children = children
        self.root = os.path.join(work, name)
        self.log_path = os.path.join(work, "requests.log" if name == "s3" else f"{name}-requests.log")
        self.latency_ms = latency_ms
        os.makedirs(self.root, exist_ok=True)
        open(self.log_path, "w").close()
        self.stderr = open(os.path.join(work, f"{name}-server.err"), "w")
        cmd = [exe, "--port", "0", "--root", self.root, "--request-log", self.log_path]
        if latency_ms:
            cmd += ["--latency-ms", str(latency_ms)]
        self.proc = children.start(cmd, stdout=subprocess.PIPE, stderr=self.stderr)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        if not ready:
            raise RuntimeError("S3 server did not start in 30 s")
        line = self.proc.stdout.readline().decode().strip()
        fields = dict(kv.split("=", 1) for kv in line.split())
        if "endpoint" not in fields:
            raise RuntimeError(f"S3 server said {line!r}")
        self.endpoint = fields["endpoint"]
        self.bucket = fields["bucket"]
        self.access_key = fields["access_key"]
        self.secret_key = fields["secret_key"]
        self.region = fields.get("region", "us-east-1")
        assert self.endpoint.startswith("http://127.0.0.1:"), self.endpoint
        slow = f", +{latency_ms} ms a request" if latency_ms else ""
        log(f"S3 server {self.endpoint} bucket {self.bucket}{slow}, objects in {self.root}")

    def stop(self):
        self.children.stop(self.proc, timeout=5)

    def path(self, key_prefix):
        return os.path.join(self.root, self.bucket, key_prefix)

    def objects(self, key_prefix):
        """Relative paths of the objects under a key prefix (a directory in s3s-fs)."""
        base = self.path(key_prefix)
        found = set()
        for dirpath, _, files in os.walk(base):
            for name in files:
                found.add(os.path.relpath(os.path.join(dirpath, name), base))
        return found

    def remove(self, key_prefix):
        shutil.rmtree(self.path(key_prefix), ignore_errors=True)

    def log_offset(self):
        return os.path.getsize(self.log_path)

    def requests(self, start, end=None):
        """(method, key, query, agent) of each request logged between two offsets. The key is
        a LIST's prefix for a LIST, and empty where the request names no key (a multi-object
        delete)."""
        with open(self.log_path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(end - start)
        out = []
        for line in data.decode(errors="replace").splitlines():
            if not line.strip():
                continue
            method, target, agent = (line.split(" ") + ["-", "-"])[:3]
            url = urllib.parse.urlsplit(target)
            path = urllib.parse.unquote(url.path).lstrip("/")
            _, _, key = path.partition("/")  # drop the bucket
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            if not key and "prefix" in query:  # a LIST: attribute it by its prefix
                key = query["prefix"][0]
            out.append((method, key, url.query, agent))
        return out

    def env(self):
        """What a tool needs to reach this server, and nothing else from our environment:
        no CA bundle (the AWS Go SDK refuses AWS_CA_BUNDLE with its custom HTTP client), no
        proxies, no profiles, no instance-metadata look-ups."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_SESSION_TOKEN": "",
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }


def classify(requests):
    """Counts by kind: PUT, GET (object), LIST, HEAD, DELETE, POST (multipart), other."""
    counts = {}
    for method, _, query, _ in requests:
        kind = method
        if method == "GET" and "list-type" in query:
            kind = "LIST"
        elif method == "POST" and "delete" in query:
            kind = "DELETE"
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def under(request, prefix):
    prefix = prefix.rstrip("/")
    return request[1] == prefix or request[1].startswith(prefix + "/")


def attribute(requests, prefixes):
    """Requests by tool: {name: [request]} for {name: key prefix}, and the ones that could
    not be told apart under None. A request goes to the tool whose prefix its key (or LIST
    prefix) is under; one that names no key (a multi-object delete) goes to the only tool
    whose other requests came with the same User-Agent word."""
    out = {name: [] for name in prefixes}
    out[None] = []
    keyless = []
    for r in requests:
        owners = [name for name, p in prefixes.items() if under(r, p)]
        if len(owners) == 1:
            out[owners[0]].append(r)
        elif not r[1]:
            keyless.append(r)
        else:
            out[None].append(r)
    agents = {name: {r[3] for r in out[name]} for name in prefixes}
    for r in keyless:
        owners = [name for name in prefixes if r[3] in agents[name]]
        out[owners[0] if len(owners) == 1 else None].append(r)
    return out


# ---------------------------------------------------------------------------------------------
# Databases.


def connect(path):
    conn = sqlite3.connect(path, timeout=10)
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def make_db(path, rows=200, row_bytes=200, seed=0):
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    rng = random.Random(seed)
    conn = connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, body BLOB, at REAL)")
    conn.executemany("INSERT INTO t(body, at) VALUES (?, ?)",
                     ((rng.randbytes(row_bytes), time.time()) for _ in range(rows)))
    conn.commit()
    conn.close()
    return path


def make_big_db(path, mib):
    """About `mib` MiB in WAL mode: 4 KiB rows, half random bytes and half text (so it
    compresses about 2:1)."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    rng = random.Random(42)
    conn = connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE blobs(id INTEGER PRIMARY KEY, body BLOB)")
    text = (b"walsync benchmark row " * 100)[:2000]
    rows = mib * MIB // 4096
    batch = 1000
    for start in range(0, rows, batch):
        conn.executemany("INSERT INTO blobs(body) VALUES (?)",
                         ((rng.randbytes(2000) + text,) for _ in range(min(batch, rows - start))))
        conn.commit()
    conn.close()
    return os.path.getsize(path)


def db_digest(path):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*), sum(length(body)), max(id) FROM blobs").fetchone()
    finally:
        conn.close()


def writer_main(argv):
    """`bench.py writer --interval S --duration S DB...`: one commit every `interval` seconds,
    round-robin over the databases, for `duration` seconds (a separate process, so the
    benchmark's own work does not delay it)."""
    p = argparse.ArgumentParser(prog="bench.py writer")
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--row-bytes", type=int, default=1024)
    p.add_argument("dbs", nargs="+")
    a = p.parse_args(argv)
    conns = [connect(db) for db in a.dbs]
    rng = random.Random(7)
    start = time.monotonic()
    n = 0
    late = 0.0
    while True:
        due = start + n * a.interval
        if due - start >= a.duration:
            break
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        else:
            late = max(late, now - due)
        conn = conns[n % len(conns)]
        conn.execute("INSERT INTO t(body, at) VALUES (?, ?)", (rng.randbytes(a.row_bytes), time.time()))
        conn.commit()
        n += 1
    for conn in conns:
        conn.close()
    print(json.dumps({"commits": n, "max_late_s": round(late, 3)}))


def commit_writer_main(argv):
    """`bench.py commit-writer --interval S --duration S --busy-timeout-ms N DB`: an
    application writing one small transaction (BEGIN IMMEDIATE, one INSERT, COMMIT) every
    `interval` seconds to one database, with SQLite's defaults otherwise (synchronous FULL,
    wal_autocheckpoint 1000). Times every transaction from BEGIN to COMMIT's return, counts
    "database is locked" (SQLITE_BUSY after the busy timeout) and other errors, and counts
    WAL restarts (a new salt in the WAL header: a checkpoint finished and a writer started
    the WAL over). Prints a JSON summary."""
    p = argparse.ArgumentParser(prog="bench.py commit-writer")
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--duration", type=float, default=60)
    p.add_argument("--busy-timeout-ms", type=int, default=5000)
    p.add_argument("--row-bytes", type=int, default=200)
    p.add_argument("db")
    a = p.parse_args(argv)
    # isolation_level=None: the module issues no BEGIN of its own; we say BEGIN IMMEDIATE.
    conn = sqlite3.connect(a.db, isolation_level=None, timeout=a.busy_timeout_ms / 1000)
    conn.execute(f"PRAGMA busy_timeout={a.busy_timeout_ms}")
    wal = a.db + "-wal"

    def wal_salt():
        try:
            with open(wal, "rb") as f:
                header = f.read(24)
        except FileNotFoundError:
            return None
        return header[16:24] if len(header) == 24 else None

    rng = random.Random(11)
    latencies_ms, slowest = [], []
    locked, failed_ms, other_errors = 0, [], {}
    salt, restarts = wal_salt(), 0
    late = 0.0
    start = time.monotonic()
    n = 0
    while True:
        due = start + n * a.interval
        if due - start >= a.duration:
            break
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        else:
            late = max(late, now - due)
        n += 1
        t0 = time.monotonic()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t(body, at) VALUES (?, ?)",
                         (rng.randbytes(a.row_bytes), time.time()))
            conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            took = (time.monotonic() - t0) * 1000
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if "locked" in str(e) or "busy" in str(e):
                locked += 1
                failed_ms.append(round(took, 3))
            else:
                other_errors[str(e)] = other_errors.get(str(e), 0) + 1
            continue
        took = (time.monotonic() - t0) * 1000
        latencies_ms.append(took)
        slowest.append((took, t0 - start))
        if len(slowest) > 20:
            slowest = sorted(slowest, reverse=True)[:5]
        now_salt = wal_salt()
        if now_salt is not None and salt is not None and now_salt != salt:
            restarts += 1
        salt = now_salt if now_salt is not None else salt
    conn.close()
    print(json.dumps({
        "attempts": n,
        "commits": len(latencies_ms),
        "locked_errors": locked,
        "locked_attempts_ms": failed_ms,
        "other_errors": other_errors,
        "p50_ms": round(percentile(latencies_ms, 50), 3) if latencies_ms else None,
        "p99_ms": round(percentile(latencies_ms, 99), 3) if latencies_ms else None,
        "max_ms": round(max(latencies_ms), 3) if latencies_ms else None,
        "mean_ms": round(sum(latencies_ms) / len(latencies_ms), 3) if latencies_ms else None,
        "slowest": [{"ms": round(ms, 3), "at_s": round(at, 2)}
                    for ms, at in sorted(slowest, reverse=True)[:5]],
        "wal_restarts": restarts,
        "max_late_s": round(late, 3),
    }))


def bulk_writer_main(argv):
    """`bench.py bulk-writer --mib M --rows-per-txn R DB`: an application writing M MiB as
    fast as it can, in transactions of R rows of 1000 bytes each (half random bytes, half
    repeated text, so the data compresses about 2:1), with SQLite's defaults (synchronous
    FULL, wal_autocheckpoint 1000), or with `--autocheckpoint N` (0: checkpoints left to the
    replicator). Prints a JSON summary with its wall time and its longest transactions (each
    timed from its first statement to its commit's return: a replicator holding the write
    lock shows up there, as the wait in SQLite's busy handler)."""
    p = argparse.ArgumentParser(prog="bench.py bulk-writer")
    p.add_argument("--mib", type=float, required=True)
    p.add_argument("--rows-per-txn", type=int, required=True)
    p.add_argument("--autocheckpoint", type=int)
    p.add_argument("db")
    a = p.parse_args(argv)
    conn = connect(a.db)
    if a.autocheckpoint is not None:
        conn.execute(f"PRAGMA wal_autocheckpoint={a.autocheckpoint:d}")
    conn.execute("CREATE TABLE IF NOT EXISTS bulk(id INTEGER PRIMARY KEY, body BLOB)")
    conn.commit()
    rng = random.Random(5)
    text = (b"walsync benchmark bulk row " * 40)[:500]
    rows = int(a.mib * MIB) // 1000
    start = time.monotonic()
    txn_s = []
    for first in range(0, rows, a.rows_per_txn):
        n = min(a.rows_per_txn, rows - first)
        began = time.monotonic()
        conn.executemany("INSERT INTO bulk(body) VALUES (?)",
                         ((rng.randbytes(500) + text,) for _ in range(n)))
        conn.commit()
        txn_s.append(time.monotonic() - began)
    wall = time.monotonic() - start
    conn.close()
    ranked = sorted(txn_s)
    print(json.dumps({"rows": rows, "transactions": len(txn_s), "bytes": rows * 1000,
                      "wall_s": round(wall, 3),
                      "txn_max_ms": round(ranked[-1] * 1000, 1),
                      "txn_p99_ms": round(ranked[int(len(ranked) * 0.99)] * 1000, 1)}))


def token_writer_main(argv):
    """`bench.py token-writer --interval S --count N DB`: N commits, one every S seconds, each
    inserting one row that holds a fresh random 16-byte token. Prints one JSON line per
    commit (token in hex, wall-clock time just after COMMIT returned), flushed at once, so the
    lag phase can find each commit in the objects the tool stores. The token is random so
    that it stays verbatim in an LZ4-compressed object (Litestream's LTX) and unique enough
    never to be found by accident."""
    p = argparse.ArgumentParser(prog="bench.py token-writer")
    p.add_argument("--interval", type=float, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("db")
    a = p.parse_args(argv)
    conn = connect(a.db)
    start = time.monotonic()
    for n in range(a.count):
        due = start + n * a.interval
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        token = os.urandom(16)
        conn.execute("INSERT INTO t(body, at) VALUES (?, ?)", (token + os.urandom(48), time.time()))
        conn.commit()
        print(json.dumps({"token": token.hex(), "at": time.time()}), flush=True)
    conn.close()


# ---------------------------------------------------------------------------------------------
# The tools.


class Tool:
    name = "?"

    def __init__(self, exe, server, children, work):
        self.exe = exe
        self.server = server
        self.children = children
        self.work = work

    def replica_dir(self, prefix, name):
        """Key prefix of one database's replica."""
        return f"{prefix}/{name}"

    def increment_dir(self, prefix, name):
        """Key prefix where each shipped batch of commits lands as a new object."""
        raise NotImplementedError

    def start(self, dbs, prefix, tag, verbose=False):
        """Start watching `dbs` [(path, name)]; output to `tag`.<tool>.log in the work
        directory. `verbose`: debug logging, where the tool has it."""
        raise NotImplementedError


class Walsync(Tool):
    name = "walsync"

    def watch_available(self):
        try:
            r = subprocess.run([self.exe, "watch", "--help"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0

    def increment_dir(self, prefix, name):
        return f"{prefix}/{name}/wal"

    def start(self, dbs, prefix, tag, verbose=False):
        cmd = [self.exe, *(["-v"] if verbose else []), "watch",
               *[f"{path}:{name}" for path, name in dbs],
               "-b", f"s3://{self.server.bucket}/{prefix}", "--endpoint", self.server.endpoint]
        out = open(os.path.join(self.work, f"{tag}.walsync.log"), "w")
        return self.children.start(cmd, env=self.server.env(), stdout=out, stderr=subprocess.STDOUT)

    def snapshot_cmd(self, db, prefix, name):
        return [self.exe, "snapshot", db, "-b", f"s3://{self.server.bucket}/{prefix}", "--name", name]

    def restore_cmd(self, prefix, name, out):
        return [self.exe, "restore", name, "-o", out, "-b", f"s3://{self.server.bucket}/{prefix}"]


class Litestream(Tool):
    """Litestream 0.5.x: one `replica:` per database (0.3.x's `replicas:` list also still
    parses). Defaults kept: sync-interval 1 s, monitor-interval 1 s, L1/L2/L3 compaction at
    30 s / 5 min / 1 h, daily snapshots. Credentials come from AWS_* in the environment."""

    name = "litestream"

    def version(self):
        try:
            return subprocess.run([self.exe, "version"], capture_output=True, text=True,
                                  timeout=10, env=self.server.env()).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None

    def increment_dir(self, prefix, name):
        return f"{prefix}/{name}/0000"  # level 0: one LTX file per sync

    def config(self, dbs, prefix, tag):
        lines = ["# generated by scripts/bench/bench.py", "dbs:"]
        for path, name in dbs:
            lines += [
                f"  - path: {path}",
                "    replica:",
                "      type: s3",
                f"      bucket: {self.server.bucket}",
                f"      path: {prefix}/{name}",
                f"      endpoint: {self.server.endpoint}",
                f"      region: {self.server.region}",
                "      force-path-style: true",
            ]
        path = os.path.join(self.work, f"{tag}.litestream.yml")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def start(self, dbs, prefix, tag, verbose=False):
        cfg = self.config(dbs, prefix, tag)
        out = open(os.path.join(self.work, f"{tag}.litestream.log"), "w")
        return self.children.start([self.exe, "replicate", "-config", cfg],
                                   env=self.server.env(), stdout=out, stderr=subprocess.STDOUT)


# ---------------------------------------------------------------------------------------------
# Waiting for replication to happen and to settle.


def wait_replicated(server, dirs, timeout, quiet=2.0, proc=None):
    """Wait until every key prefix in `dirs` holds an object and none changed for `quiet`
    seconds. Returns seconds until every prefix had an object (None on timeout)."""
    start = time.monotonic()
    deadline = start + timeout
    first_all = None
    last, last_change = None, time.monotonic()
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        snapshot = [frozenset(server.objects(d)) for d in dirs]
        now = time.monotonic()
        if first_all is None and all(snapshot):
            first_all = now - start
        if snapshot != last:
            last, last_change = snapshot, now
        elif first_all is not None and now - last_change >= quiet:
            return first_all
        time.sleep(0.1)
    return first_all


def listdir(path):
    try:
        return set(os.listdir(path))
    except FileNotFoundError:
        return set()


def percentile(values, p):
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# ---------------------------------------------------------------------------------------------
# Phases. Each returns a dict of results for one tool (or both, for idle).


def phase_rss(tool, server, work, n_dbs, duration, interval, writer_py):
    tag = f"rss{n_dbs}"
    prefix = f"bench/{tag}/{tool.name}"
    ddir = os.path.join(work, f"{tag}-{tool.name}")
    os.makedirs(ddir, exist_ok=True)
    dbs = [(make_db(os.path.join(ddir, f"db{i:03d}.db"), seed=i), f"db{i:03d}") for i in range(n_dbs)]
    log(f"{tool.name}: watching {n_dbs} database(s), one commit every {interval} s "
        f"round-robin for {duration} s")
    offset = server.log_offset()
    started = time.monotonic()
    proc = tool.start(dbs, prefix, f"{tag}")
    try:
        first = wait_replicated(server, [tool.replica_dir(prefix, n) for _, n in dbs],
                                timeout=60 + n_dbs, quiet=2, proc=proc)
        if first is None:
            log(f"{tool.name}: not every database had an object after the initial wait")
        writer = subprocess.run([sys.executable, writer_py, "writer", "--interval", str(interval),
                                 "--duration", str(duration), *[p for p, _ in dbs]],
                                capture_output=True, text=True, check=True)
        written = json.loads(writer.stdout)
        # Let the last commits ship before stopping.
        wait_replicated(server, [tool.increment_dir(prefix, n) for _, n in dbs], timeout=15,
                        quiet=2, proc=proc)
        hwm = vm_hwm_kib(proc.pid)
        stats = tool.children.stop(proc)
    finally:
        if proc.returncode is None:
            tool.children.stop(proc, timeout=5)
    elapsed = time.monotonic() - started
    requests = attribute(server.requests(offset), {tool.name: prefix})[tool.name]
    missing = [n for _, n in dbs if not server.objects(tool.increment_dir(prefix, n))]
    objects = sum(len(server.objects(tool.replica_dir(prefix, n))) for _, n in dbs)
    server.remove(f"bench/{tag}/{tool.name}")
    shutil.rmtree(ddir, ignore_errors=True)
    result = {
        "dbs": n_dbs,
        "commits": written["commits"],
        "writer_max_late_s": written["max_late_s"],
        "peak_rss_kib": stats["maxrss_kib"],
        "vm_hwm_before_stop_kib": hwm,
        "cpu_s": stats["cpu_s"],
        "wall_s": round(elapsed, 1),
        "exit_code": stats["rc"],
        "killed": stats["killed"],
        "initial_replication_s": None if first is None else round(first, 2),
        "requests": len(requests),
        "requests_by_kind": classify(requests),
        "objects_at_end": objects,
        "dbs_without_increments": len(missing),
    }
    log(f"{tool.name}: peak RSS {result['peak_rss_kib']} KiB, CPU {result['cpu_s']} s, "
        f"{result['requests']} requests {result['requests_by_kind']}")
    return result


def object_payload(path):
    """The bytes of a stored object as a tool wrote them, gunzipped when gzipped (walsync);
    None if it cannot be read whole yet (still being written)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if path.endswith(".gz"):
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            return None
    return data


def phase_lag(tool, server, work, rates, writer_py):
    """Replication lag at several commit rates: for each (interval, count), a fresh database
    and a fresh run of the tool with its defaults; `token-writer` commits one row holding a
    random token every `interval` s; this process lists the directory where the tool stores
    each shipped batch every 5 ms, reads each new object at once, and finds the tokens in
    it. A commit's lag is from COMMIT returning to the first stored object that holds it
    appearing in the server's directory, so it counts every commit, also when one object
    carries many."""
    results = {}
    for i, (interval, count) in enumerate(rates):
        tag = f"lag{i}"
        prefix = f"bench/{tag}/{tool.name}"
        db = make_db(os.path.join(work, f"{tag}-{tool.name}.db"))
        proc = tool.start([(db, "lag")], prefix, tag)
        found, pending_tokens, unread = {}, {}, {}
        writer = None
        try:
            if wait_replicated(server, [tool.replica_dir(prefix, "lag")], timeout=60, quiet=2,
                               proc=proc) is None:
                raise RuntimeError(f"{tool.name} did not replicate the lag database in 60 s")
            inc = server.path(tool.increment_dir(prefix, "lag"))
            seen = set(server.objects(tool.increment_dir(prefix, "lag")))
            log(f"{tool.name}: replication lag over {count} commits {interval:g} s apart")
            writer = subprocess.Popen([sys.executable, writer_py, "token-writer", "--interval",
                                       str(interval), "--count", str(count), db],
                                      stdout=subprocess.PIPE)
            out_fd = writer.stdout.fileno()
            os.set_blocking(out_fd, False)
            buffered = b""

            def take(lines):
                for line in lines:
                    if line.strip():
                        entry = json.loads(line)
                        pending_tokens[bytes.fromhex(entry["token"])] = entry["at"]

            def read_writer():
                nonlocal buffered
                while True:
                    try:
                        chunk = os.read(out_fd, 65536)
                    except BlockingIOError:
                        return
                    if not chunk:
                        return
                    buffered += chunk
                    *lines, buffered = buffered.split(b"\n")
                    take(lines)

            done_at = None
            while True:
                now = time.time()
                read_writer()
                for rel in set(server.objects(tool.increment_dir(prefix, "lag"))) - seen:
                    seen.add(rel)
                    unread[rel] = now
                for rel, at in list(unread.items()):
                    data = object_payload(os.path.join(inc, rel))
                    if data is None and now - at < 5:
                        continue  # still being written: read it on the next round
                    del unread[rel]
                    for token in [t for t in pending_tokens if data and t in data]:
                        found[token] = (pending_tokens.pop(token), at)
                if writer.poll() is not None and done_at is None:
                    done_at = time.monotonic()
                    read_writer()
                    take([buffered])
                    buffered = b""
                if done_at is not None and not pending_tokens and not unread:
                    break
                if done_at is not None and time.monotonic() - done_at > 15:
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"{tool.name} exited with {proc.returncode}")
                time.sleep(0.005)
            stats = tool.children.stop(proc)
        finally:
            if writer is not None and writer.poll() is None:
                writer.kill()
                writer.wait()
            if proc.returncode is None:
                tool.children.stop(proc, timeout=5)
        server.remove(prefix)
        remove_db(db)
        shutil.rmtree(os.path.join(work, f".{tag}-{tool.name}.db-walsync"), ignore_errors=True)
        ms = sorted(round((seen_at - at) * 1000, 1) for at, seen_at in found.values())
        result = {
            "interval_s": interval,
            "commits": count,
            "detected": len(ms),
            "missed": len(pending_tokens),
            "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99),
            "mean_ms": round(sum(ms) / len(ms), 1) if ms else None,
            "max_ms": max(ms) if ms else None,
            "exit_code": stats["rc"],
        }
        log(f"{tool.name}: one commit every {interval:g} s: lag p50 {result['p50_ms']} ms, "
            f"p99 {result['p99_ms']} ms, missed {result['missed']}")
        results[f"{interval:g}"] = result
    return results


def phase_heavy(tool, server, work, mib, rows_per_txn, writer_py, tag, autocheckpoint=None):
    """An application writing `mib` MiB as fast as it can in transactions of `rows_per_txn`
    rows (`bulk-writer`), under `tool` with its defaults (None: no replication). Measures the
    application's wall time, and for a tool its CPU time (user + sys, from wait4, start and
    stop included), peak RSS, the bytes it stored, and how long it took to catch up after
    the last commit. `autocheckpoint`: the application's `wal_autocheckpoint` (None: SQLite's
    default, 1000)."""
    name = tool.name if tool else "none"
    prefix = f"bench/{tag}/{name}"
    db = make_db(os.path.join(work, f"{tag}-{name}.db"), rows=10)
    proc = None
    try:
        if tool is not None:
            proc = tool.start([(db, tag)], prefix, f"{tag}-{name}")
            if wait_replicated(server, [tool.replica_dir(prefix, tag)], timeout=60, quiet=2,
                               proc=proc) is None:
                raise RuntimeError(f"{tool.name} did not replicate the {tag} database in 60 s")
        log(f"{name}: writing {mib:g} MiB in {rows_per_txn}-row transactions")
        ac = [] if autocheckpoint is None else ["--autocheckpoint", str(autocheckpoint)]
        writer = subprocess.run([sys.executable, writer_py, "bulk-writer", "--mib", str(mib),
                                 "--rows-per-txn", str(rows_per_txn), *ac, db],
                                capture_output=True, text=True, check=True)
        result = json.loads(writer.stdout)
        result["mib"] = mib
        result["rows_per_txn"] = rows_per_txn
        if proc is not None:
            written = time.monotonic()
            wait_replicated(server, [tool.replica_dir(prefix, tag)], timeout=300, quiet=3,
                            proc=proc)
            result["catch_up_s"] = round(max(0.0, time.monotonic() - written - 3), 1)
            stats = tool.children.stop(proc, timeout=120)
            result.update({"cpu_s": stats["cpu_s"], "peak_rss_kib": stats["maxrss_kib"],
                           "exit_code": stats["rc"],
                           "stored_bytes": dir_bytes(server.path(prefix))})
            result["cpu_ms_per_mib"] = round(stats["cpu_s"] * 1000 / mib, 1)
    finally:
        if proc is not None and proc.returncode is None:
            tool.children.stop(proc, timeout=5)
    server.remove(prefix)
    remove_db(db)
    shutil.rmtree(os.path.join(work, f".{tag}-{name}.db-walsync"), ignore_errors=True)
    log(f"{name}: {result}")
    return result


def phase_heavy_reps(watchers, server, work, mib, rows_per_txn, writer_py, reps):
    """`phase_heavy` `reps` times, interleaved (no replication, then each tool, then again),
    so that other load on the machine falls on every column alike: one run's writer wall
    time varied by 15% from run to run on this machine. Each tool's result is its run with
    the median writer wall time (its CPU, bytes stored, RSS and catch-up come from that
    run), with every run's wall time beside it; "none" is the writer with no replication."""
    runs = {}
    for rep in range(reps):
        for tool in [None, *watchers]:
            name = tool.name if tool else "none"
            log(f"heavy, run {rep + 1} of {reps}: {name}")
            runs.setdefault(name, []).append(
                phase_heavy(tool, server, work, mib, rows_per_txn, writer_py, "heavy"))
    out = {}
    for name, rs in runs.items():
        ranked = sorted(rs, key=lambda r: r["wall_s"])
        median = dict(ranked[(len(ranked) - 1) // 2])
        median["walls_s"] = [r["wall_s"] for r in rs]
        # The longest transactions vary from run to run more than the wall time: medians of
        # each run's own.
        for key in ("txn_max_ms", "txn_p99_ms"):
            median[f"{key}_median"] = statistics.median(r[key] for r in rs)
        out[name] = median
    return out


def phase_slowdown(watchers, server, work, mib, rows_per_txn, writer_py, reps):
    """The application's slowdown: `phase_heavy`'s writer with no replication and under each
    tool, with the application's default checkpointing and with `wal_autocheckpoint=0`
    (checkpoints left to the replicator), interleaved (none, walsync, Litestream, then again)
    `reps` times, so that other load on the machine falls on every column alike. Each
    setting's ratio is the median wall time under the tool over the median with none."""
    settings = {"default": None, "autocheckpoint_0": 0}
    runs = {s: {} for s in settings}
    for rep in range(reps):
        for setting, ac in settings.items():
            for tool in [None, *watchers]:
                name = tool.name if tool else "none"
                log(f"slowdown {setting}, run {rep + 1} of {reps}: {name}")
                # A short tag: s3s-fs names an incomplete multipart upload's file after the
                # bucket and key in base64, and with "slowdown-autocheckpoint_0" twice in the
                # key that name passed 255 bytes, so the test server answered walsync's
                # CreateMultipartUpload with 500 and the run stored nothing.
                tag = "slow-ac0" if ac == 0 else "slow-default"
                r = phase_heavy(tool, server, work, mib, rows_per_txn, writer_py, tag,
                                autocheckpoint=ac)
                runs[setting].setdefault(name, []).append(r)
    out = {}
    for setting, by_tool in runs.items():
        out[setting] = {}
        for name, rs in by_tool.items():
            walls = [r["wall_s"] for r in rs]
            out[setting][name] = {"wall_s": statistics.median(walls), "walls_s": walls,
                                  "runs": rs}
    return out


def phase_many(tool, server, work, n_dbs, idle_seconds):
    """`tool` watching `n_dbs` small databases that nobody writes: how long until every one
    has an object stored and the tool has gone quiet (startup), then over an idle window the
    S3 requests it makes and its resident size at the end of it (RSS once idle)."""
    tag = f"many{n_dbs}"
    prefix = f"bench/{tag}/{tool.name}"
    ddir = os.path.join(work, f"{tag}-{tool.name}")
    os.makedirs(ddir, exist_ok=True)
    dbs = [(make_db(os.path.join(ddir, f"db{i:04d}.db"), rows=20, seed=i), f"db{i:04d}")
           for i in range(n_dbs)]
    log(f"{tool.name}: watching {n_dbs} idle database(s)")
    started = time.monotonic()
    proc = tool.start(dbs, prefix, tag)
    result = {"dbs": n_dbs}
    try:
        first = wait_replicated(server, [tool.replica_dir(prefix, n) for _, n in dbs],
                                timeout=120 + n_dbs, quiet=5, proc=proc)
        result["startup_s"] = None if first is None else round(first, 1)
        result["settled_s"] = round(time.monotonic() - started, 1)
        offset = server.log_offset()
        time.sleep(idle_seconds)
        requests = attribute(server.requests(offset), {tool.name: prefix})[tool.name]
        result["idle_seconds"] = idle_seconds
        result["idle_requests"] = len(requests)
        result["idle_requests_by_kind"] = classify(requests)
        result["idle_rss_kib"] = vm_rss_kib(proc.pid)
        result["threads"] = threads_of(proc.pid)
        result["open_files"] = open_files_of(proc.pid)
        stats = tool.children.stop(proc, timeout=60)
        result.update({"peak_rss_kib": stats["maxrss_kib"], "cpu_s": stats["cpu_s"],
                       "exit_code": stats["rc"]})
    except RuntimeError as e:
        result["error"] = str(e)
        log(f"{tool.name}: {n_dbs} databases: {e}")
    finally:
        if proc.returncode is None:
            tool.children.stop(proc, timeout=5)
    server.remove(prefix)
    shutil.rmtree(ddir, ignore_errors=True)
    log(f"{tool.name}: {result}")
    return result


def maps_of(pid):
    try:
        with open(f"/proc/{pid}/maps") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def footprint(pid):
    return {"rss_kib": vm_rss_kib(pid), "open_files": open_files_of(pid),
            "maps": maps_of(pid), "threads": threads_of(pid)}


def make_tenants(ddir, n_dbs):
    """`n_dbs` small WAL databases laid out as a host of tenants: DIR/tNNNNN/app.db."""
    dbs = []
    for i in range(n_dbs):
        tenant = os.path.join(ddir, f"t{i:05d}")
        os.makedirs(tenant, exist_ok=True)
        dbs.append((make_db(os.path.join(tenant, "app.db"), rows=20, seed=i), f"t{i:05d}.app"))
    return dbs


# How long the tenants phase measures CPU once idle (after `tenant_idle_seconds`).
TENANT_CPU_SECONDS = 60

# How long a restart is watched: its requests are counted over this window, and it is quiet
# from its last request on (a tool that never stops asking is quiet only at the end).
RESTART_WINDOW = 60

# A process is quiet from the start of QUIET_SECONDS seconds in a row, in each of which it
# used less than QUIET_SHARE of a core.
QUIET_SHARE = 0.05
QUIET_SECONDS = 3


class CpuWatch:
    """The CPU a process uses from now on, sampled at each `sample()` (call it more often
    than once a second): how much in all, and from when it was quiet. Its work after its last
    request counts, which a count of requests does not see; a burst of periodic work later
    (walsync scans a directory tree every 10 s) does not move the quiet start."""

    def __init__(self, pid):
        self.pid, self.started = pid, time.monotonic()
        self.last = (self.started, cpu_seconds_of(pid) or 0.0)
        self.seconds = [self.last]  # (time, CPU) about a second apart
        self.quiet_from = None

    def sample(self):
        now, cpu = time.monotonic(), cpu_seconds_of(self.pid)
        if cpu is None:
            return
        self.last = (now, cpu)
        if now - self.seconds[-1][0] < 1.0:
            return
        self.seconds.append(self.last)
        recent = self.seconds[-QUIET_SECONDS - 1:]
        if self.quiet_from is None and len(recent) == QUIET_SECONDS + 1 and all(
                (c1 - c0) / (t1 - t0) < QUIET_SHARE
                for (t0, c0), (t1, c1) in zip(recent, recent[1:])):
            self.quiet_from = recent[0][0]

    def quiet_s(self):
        """Seconds from the start to the quiet start (None: not quiet yet)."""
        return None if self.quiet_from is None else round(self.quiet_from - self.started, 1)

    def cpu_s(self):
        return round(self.last[1] - self.seconds[0][1], 1)


def phase_tenants(tool, server, work, n_dbs, idle_seconds):
    """A host of `n_dbs` idle tenant databases. walsync watches their directory
    (`--dir --recursive`); Litestream is given each one in its configuration. Measures the
    first start (until every database has an object stored and the tool is quiet for 5 s),
    the footprint once idle (RSS, descriptors, memory maps, threads) and the requests made
    meanwhile, then a restart of the replicated host: how long until quiet again, the
    requests it cost (per database) and the snapshots it stored (none is needed)."""
    tag = f"tenants{n_dbs}"
    prefix = f"bench/{tag}/{tool.name}"
    ddir = os.path.join(work, f"{tag}-{tool.name}")
    os.makedirs(ddir, exist_ok=True)
    log(f"{tool.name}: creating {n_dbs} tenant databases")
    dbs = make_tenants(ddir, n_dbs)
    dirs = [tool.replica_dir(prefix, n) for _, n in dbs]
    result = {"dbs": n_dbs}

    def start():
        if tool.name == "walsync":
            cmd = [tool.exe, "watch", "--dir", ddir, "--recursive",
                   "-b", f"s3://{server.bucket}/{prefix}", "--endpoint", server.endpoint]
            out = open(os.path.join(work, f"{tag}.walsync.log"), "a")
            return tool.children.start(cmd, env=server.env(), stdout=out,
                                       stderr=subprocess.STDOUT)
        return tool.start(dbs, prefix, tag)

    def snapshots_stored():
        return sum(1 for d in dirs for o in server.objects(d)
                   if "snapshot" in o or o.endswith(".db.gz"))

    proc = start()
    try:
        started = time.monotonic()
        first = wait_replicated(server, dirs, timeout=300 + n_dbs / 5, quiet=5, proc=proc)
        if first is None:
            raise RuntimeError("not every database was stored in time")
        result["first_start_s"] = round(first, 1)
        result["first_start_settled_s"] = round(time.monotonic() - started, 1)
        result["first_start_peak_rss_kib"] = vm_hwm_kib(proc.pid)
        offset = server.log_offset()
        time.sleep(idle_seconds)
        requests = attribute(server.requests(offset), {tool.name: prefix})[tool.name]
        result["idle_seconds"] = idle_seconds
        result["idle_requests"] = len(requests)
        result["idle"] = footprint(proc.pid)
        # CPU once idle: over a minute more, long enough for every database's re-check
        # (walsync: a resting database's every minute).
        before = cpu_seconds_of(proc.pid)
        time.sleep(TENANT_CPU_SECONDS)
        after = cpu_seconds_of(proc.pid)
        if before is not None and after is not None:
            result["idle_cpu_pct"] = round((after - before) * 100 / TENANT_CPU_SECONDS, 2)
        tool.children.stop(proc, timeout=120)

        snapshots_before = snapshots_stored()
        offset = server.log_offset()
        log(f"{tool.name}: restarting over {n_dbs} replicated databases")
        restarted = time.monotonic()
        proc = start()
        cpu = CpuWatch(proc.pid)
        # Every request of the first RESTART_WINDOW seconds; quiet from the last one on.
        last_count, last_change = 0, time.monotonic()
        while time.monotonic() - restarted < RESTART_WINDOW:
            if proc.poll() is not None:
                raise RuntimeError(f"{tool.name} exited on restart with {proc.returncode}")
            count = len(server.requests(offset))
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            cpu.sample()
            time.sleep(0.2)
        requests = attribute(server.requests(offset), {tool.name: prefix})[tool.name]
        result["restart_quiet_s"] = round(last_change - restarted, 1)
        result["restart_cpu_quiet_s"] = cpu.quiet_s()
        result["restart_cpu_s"] = cpu.cpu_s()
        result["restart_requests"] = len(requests)
        result["restart_requests_by_kind"] = classify(requests)
        result["restart_snapshots"] = snapshots_stored() - snapshots_before
        result["restart"] = footprint(proc.pid)
        stats = tool.children.stop(proc, timeout=120)
        result.update({"peak_rss_kib": stats["maxrss_kib"], "exit_code": stats["rc"]})
        if tool.name == "walsync":
            result["file_restart"] = file_restart(tool, ddir, work, tag, [n for _, n in dbs])
    except RuntimeError as e:
        result["error"] = str(e)
        log(f"{tool.name}: {n_dbs} tenants: {e}")
    finally:
        if proc.returncode is None:
            tool.children.stop(proc, timeout=5)
    server.remove(prefix)
    shutil.rmtree(ddir, ignore_errors=True)
    log(f"{tool.name}: {result}")
    return result


def file_restart(tool, ddir, work, tag, names):
    """walsync's restart over the same tenants (replicated as `names`) kept in a `file://`
    destination, where the listing of each replica is walsync's own work, not a server's: a
    first start, stopped once every database has an object stored and walsync is quiet,
    then a restart, watched until quiet (at most RESTART_WINDOW): the CPU each used until
    then, and when it was quiet."""
    dest = os.path.join(work, f"{tag}-file-dest")

    def all_stored():
        return all(any(files for _, _, files in os.walk(os.path.join(dest, name)))
                   for name in names)

    cmd = [tool.exe, "watch", "--dir", ddir, "--recursive", "-b", f"file://{dest}"]
    out = open(os.path.join(work, f"{tag}.walsync-file.log"), "a")
    result = {}
    try:
        for run in ("first", "restart"):
            proc = tool.children.start(cmd, stdout=out, stderr=subprocess.STDOUT)
            cpu = CpuWatch(proc.pid)
            limit = 300 + len(names) / 5 if run == "first" else RESTART_WINDOW
            # The first start: quiet counts only once every database is stored (one
            # waiting for its turn at the descriptors uses no CPU meanwhile).
            stored = run != "first"
            while time.monotonic() - cpu.started < limit:
                if proc.poll() is not None:
                    raise RuntimeError(f"walsync exited on its {run} start over file://")
                if not stored and all_stored():
                    result["first_stored_s"] = round(time.monotonic() - cpu.started, 1)
                    stored, cpu = True, CpuWatch(proc.pid)
                cpu.sample()
                if stored and cpu.quiet_s() is not None:
                    break
                time.sleep(0.2)
            else:
                raise RuntimeError(f"walsync's {run} start over file:// was not quiet "
                                   f"within {limit:.0f} s")
            if run == "restart":
                result["restart_quiet_s"], result["restart_cpu_s"] = cpu.quiet_s(), cpu.cpu_s()
            tool.children.stop(proc, timeout=120)
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    log(f"walsync: {tag} over file://: {result}")
    return result


def phase_pickup(tool, server, work, n_dbs):
    """walsync watching an empty directory while `n_dbs` databases are created in it one by
    one: for each, the time from its first commit in WAL mode to its first object stored
    (the object file's modification time in the server's directory, so that the time spent
    creating the other databases before this loop looks does not count)."""
    tag = f"pickup{n_dbs}"
    prefix = f"bench/{tag}/{tool.name}"
    ddir = os.path.join(work, f"{tag}-{tool.name}")
    os.makedirs(ddir, exist_ok=True)
    cmd = [tool.exe, "watch", "--dir", ddir, "-b", f"s3://{server.bucket}/{prefix}",
           "--endpoint", server.endpoint]
    out = open(os.path.join(work, f"{tag}.walsync.log"), "w")
    proc = tool.children.start(cmd, env=server.env(), stdout=out, stderr=subprocess.STDOUT)
    result = {"dbs": n_dbs}
    try:
        time.sleep(2)
        created = {}
        for i in range(n_dbs):
            name = f"new{i:03d}"
            make_db(os.path.join(ddir, f"{name}.db"), rows=5, seed=i)
            created[name] = time.time()
            time.sleep(0.05)
        seen = {}
        deadline = time.monotonic() + 60
        while len(seen) < n_dbs and time.monotonic() < deadline:
            for name, at in created.items():
                replica = tool.replica_dir(prefix, name)
                stored = server.objects(replica) if name not in seen else None
                if stored:
                    times = []
                    for o in stored:
                        try:
                            times.append(os.path.getmtime(os.path.join(server.path(replica), o)))
                        except FileNotFoundError:  # replaced meanwhile (state.json)
                            pass
                    if times:
                        seen[name] = max(0.0, min(times) - at)
            time.sleep(0.05)
        latencies = sorted(seen.values())
        result.update({"picked_up": len(seen), "p50_s": round(percentile(latencies, 50), 2),
                       "p99_s": round(percentile(latencies, 99), 2),
                       "max_s": round(latencies[-1], 2) if latencies else None})
    finally:
        tool.children.stop(proc, timeout=30)
    server.remove(prefix)
    shutil.rmtree(ddir, ignore_errors=True)
    log(f"{tool.name}: pick-up {result}")
    return result


def phase_idle(tools, server, work, seconds):
    """All tools side by side, each on its own idle database; requests told apart by prefix."""
    tag = "idle"
    running = []
    results = {}
    try:
        for tool in tools:
            prefix = f"bench/{tag}/{tool.name}"
            db = make_db(os.path.join(work, f"idle-{tool.name}.db"))
            running.append((tool, prefix, tool.start([(db, "idle")], prefix, tag)))
        for tool, prefix, proc in running:
            if wait_replicated(server, [tool.replica_dir(prefix, "idle")], timeout=60, quiet=3,
                               proc=proc) is None:
                raise RuntimeError(f"{tool.name} did not replicate the idle database in 60 s")
        names = ", ".join(t.name for t in tools)
        log(f"idle window: {seconds} s, no writes ({names})")
        offset = server.log_offset()
        time.sleep(seconds)
        end = server.log_offset()
        by_tool = attribute(server.requests(offset, end), {t.name: p for t, p, _ in running})
        for tool, prefix, proc in running:
            mine = by_tool[tool.name]
            stats = tool.children.stop(proc)
            results[tool.name] = {
                "seconds": seconds,
                "requests": len(mine),
                "requests_by_kind": classify(mine),
                "requests_per_hour": round(len(mine) * 3600 / seconds, 1),
                "peak_rss_kib": stats["maxrss_kib"],
                "cpu_s": stats["cpu_s"],
                "exit_code": stats["rc"],
            }
            log(f"{tool.name}: {len(mine)} requests while idle {classify(mine)}")
        others = by_tool[None]
        results["unattributed_requests"] = len(others)
        if others:
            log(f"idle window: {len(others)} requests not told apart, e.g. {others[:3]}")
    finally:
        for _, _, proc in running:
            if proc.returncode is None:
                tools[0].children.stop(proc, timeout=5)
    for tool in tools:
        server.remove(f"bench/{tag}/{tool.name}")
    return results


def phase_snapshot_restore(walsync, litestream, server, work, mib):
    """walsync snapshot and restore of one big database, under /usr/bin/time -v. Litestream's
    nearest equivalents (`replicate -once -force-snapshot`, `restore`) when it is in the run."""
    db = os.path.join(work, "big.db")
    log(f"building a ~{mib} MiB database")
    size = make_big_db(db, mib)
    digest = db_digest(db)
    env = server.env()
    results = {}

    if walsync is not None:
        prefix = "bench/big/walsync"
        snap = run_timed(walsync.snapshot_cmd(db, prefix, "big"), env,
                         os.path.join(work, "big.walsync-snapshot.log"))
        out = os.path.join(work, "big.walsync-restored.db")
        rest = run_timed(walsync.restore_cmd(prefix, "big", out), env,
                         os.path.join(work, "big.walsync-restore.log"))
        ok = rest["rc"] == 0 and os.path.exists(out) and db_digest(out) == digest
        results["walsync"] = {"db_bytes": size, "snapshot": snap, "restore": rest,
                              "restore_matches": ok,
                              "replica_bytes": dir_bytes(server.path(prefix))}
        log(f"walsync: snapshot {snap}, restore {rest}, matches {ok}")
        remove_db(out)
        server.remove(prefix)
        shutil.rmtree(os.path.join(work, ".big.db-walsync"), ignore_errors=True)

    if litestream is not None:
        prefix = "bench/big/litestream"
        cfg = litestream.config([(db, "big")], prefix, "big")
        snap = run_timed([litestream.exe, "replicate", "-config", cfg, "-once", "-force-snapshot"],
                         env, os.path.join(work, "big.litestream-replicate.log"))
        out = os.path.join(work, "big.litestream-restored.db")
        rest = run_timed([litestream.exe, "restore", "-config", cfg, "-o", out, db], env,
                         os.path.join(work, "big.litestream-restore.log"))
        ok = rest["rc"] == 0 and os.path.exists(out) and db_digest(out) == digest
        results["litestream"] = {"db_bytes": size, "snapshot": snap, "restore": rest,
                                 "restore_matches": ok,
                                 "replica_bytes": dir_bytes(server.path(prefix))}
        log(f"litestream: replicate -once {snap}, restore {rest}, matches {ok}")
        remove_db(out)
        server.remove(prefix)
    remove_db(db)
    return results


def phase_barrier(tools, s3_exe, children, work, seconds, interval, latency_ms, writer_py):
    """Does replication make the application's commits wait, when S3 is slow?

    Replication tools take SQLite's write lock now and then (walsync: its *barrier*, around
    each checkpoint); if one held it across an S3 request, every commit meanwhile would wait
    that long, or fail with "database is locked" after its busy timeout. So: a second S3
    server whose every request takes `latency_ms` longer (a proxy in front of it); one
    database; an application committing one small transaction every `interval` s for
    `seconds` s with a 5000 ms busy timeout (`commit-writer`), first with no replication (the
    baseline), then under each tool in `tools` with its default settings. Under walsync's
    defaults such a writer reaches its PASSIVE checkpoint threshold (1000 WAL frames) about
    every 10 s, so several checkpoints fall inside the window.

    Measures per run: commit latency p50/p99/max and "database is locked" errors; for
    walsync also every barrier hold, from its `-v` log (`write lock held for N us`: from
    BEGIN IMMEDIATE succeeding to the lock's release), and its checkpoints. Litestream logs
    nothing comparable, so its lock holds show only through the commit latencies."""
    server = Server(children, s3_exe, work, name="s3-slow", latency_ms=latency_ms)
    results = {"seconds": seconds, "interval_s": interval, "s3_latency_ms": latency_ms,
               "busy_timeout_ms": 5000}
    try:
        for tool in [None, *(cls(exe, server, children, work) for cls, exe in tools)]:
            name = tool.name if tool else "none"
            results[name] = barrier_run(tool, server, work, seconds, interval, writer_py)
    finally:
        server.stop()
    return results


def barrier_run(tool, server, work, seconds, interval, writer_py):
    """One run of phase_barrier: `tool` (None: no replication) watching a fresh database
    while commit-writer runs."""
    name = tool.name if tool else "none"
    tag = f"barrier-{name}"
    prefix = f"bench/barrier/{name}"
    db = make_db(os.path.join(work, f"{tag}.db"))
    proc = None
    offset = server.log_offset()
    try:
        if tool is not None:
            proc = tool.start([(db, "barrier")], prefix, tag, verbose=True)
            if wait_replicated(server, [tool.replica_dir(prefix, "barrier")], timeout=60,
                               quiet=2, proc=proc) is None:
                raise RuntimeError(f"{tool.name} did not replicate the barrier database in 60 s")
        log(f"{name}: one commit every {interval * 1000:g} ms for {seconds} s, busy timeout "
            f"5000 ms" + (f", S3 +{server.latency_ms} ms a request" if tool else ""))
        writer = subprocess.run([sys.executable, writer_py, "commit-writer",
                                 "--interval", str(interval), "--duration", str(seconds),
                                 "--busy-timeout-ms", "5000", db],
                                capture_output=True, text=True, check=True)
        result = json.loads(writer.stdout)
        if proc is not None:
            if proc.poll() is not None:
                raise RuntimeError(f"{tool.name} exited with {proc.returncode} during the writes")
            result["exit_code"] = tool.children.stop(proc, timeout=60)["rc"]
    finally:
        if proc is not None and proc.returncode is None:
            tool.children.stop(proc, timeout=5)
    if tool is not None:
        # All of them held 200 ms (the slow server's log, so only this run's tool).
        result["s3_requests"] = len(server.requests(offset))
    if tool is not None and tool.name == "walsync":
        result.update(walsync_barrier_log(os.path.join(work, f"{tag}.walsync.log")))
    log(f"{name}: {result['commits']} commits, p50 {result['p50_ms']} ms, p99 "
        f"{result['p99_ms']} ms, max {result['max_ms']} ms, {result['locked_errors']} locked, "
        f"{result['wal_restarts']} WAL restarts"
        + (f"; write lock held {len(result['holds_us'])} times, p50 {result['hold_p50_us']} us, "
           f"max {result['hold_max_us']} us, checkpoints {result['checkpoints']}"
           if "holds_us" in result else ""))
    server.remove(prefix)
    remove_db(db)
    shutil.rmtree(os.path.join(work, f".{tag}.db-walsync"), ignore_errors=True)
    return result


def walsync_barrier_log(path):
    """Barrier holds and checkpoints from a `walsync -v watch` log: every `write lock held
    for N us` (startup, checkpoints, shutdown alike) and every `checkpoint took N ms:
    Ok(Outcome)`."""
    holds, checkpoints = [], {}
    with open(path, errors="replace") as f:
        for line in f:
            m = re.search(r"write lock held for (\d+) us", line)
            if m:
                holds.append(int(m.group(1)))
            m = re.search(r"checkpoint took \d+ ms: (\w+)\((\w+)", line)
            if m:
                outcome = m.group(2) if m.group(1) == "Ok" else "error"
                checkpoints[outcome] = checkpoints.get(outcome, 0) + 1
    return {
        "holds_us": holds,
        "hold_p50_us": percentile(holds, 50),
        "hold_p99_us": percentile(holds, 99),
        "hold_max_us": max(holds) if holds else None,
        "checkpoints": dict(sorted(checkpoints.items())),
    }


def remove_db(path):
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


def dir_bytes(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(dirpath, name))
    return total


def stripped_size(exe, work):
    """Size of the binary with symbols stripped (a copy; the original is left alone)."""
    if exe is None or not os.path.exists(exe):
        return None
    copy = os.path.join(work, os.path.basename(exe) + ".stripped")
    shutil.copyfile(exe, copy)
    if shutil.which("strip"):
        subprocess.run(["strip", copy], capture_output=True)
    size = os.path.getsize(copy)
    os.remove(copy)
    return size


# ---------------------------------------------------------------------------------------------
# Report.


def ratio(w, l):
    if w is None or l is None:
        return None
    if l == 0:
        return None if w else 1.0  # 0 vs 0: equal
    return round(w / l, 3)


def fmt(value, unit):
    if value is None:
        return "n/a"
    if unit == "bytes":
        return f"{value / MIB:.2f} MiB"
    if unit == "KiB":
        return f"{value / KIB:.1f} MiB"
    if unit == "ms":
        return f"{value:.0f} ms"
    if unit == "ms1":
        return f"{value:.1f} ms"
    if unit == "us":
        return f"{value} us"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value:.2f}%"
    return f"{value}"


def table(metrics, notes):
    rows = [("metric", "walsync", "litestream", "ratio w/l")]
    for m in metrics:
        r = m["ratio"]
        rows.append((m["label"], fmt(m["walsync"], m["unit"]), fmt(m["litestream"], m["unit"]),
                     "n/a" if r is None else f"{r:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    out = []
    for i, row in enumerate(rows):
        out.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("")
    out.append("ratio = walsync / litestream; lower is better for every row.")
    out.extend(notes)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------


def main(argv):
    if argv[:1] == ["writer"]:
        return writer_main(argv[1:])
    if argv[:1] == ["commit-writer"]:
        return commit_writer_main(argv[1:])
    if argv[:1] == ["bulk-writer"]:
        return bulk_writer_main(argv[1:])
    if argv[:1] == ["token-writer"]:
        return token_writer_main(argv[1:])
    p = argparse.ArgumentParser(prog="bench.py")
    p.add_argument("--walsync", required=True)
    p.add_argument("--s3-server", required=True)
    p.add_argument("--litestream")
    p.add_argument("--walsync-static",
                   help="walsync's static musl build: its size row, and the binary every "
                        "other walsync row runs (the one users install), when given")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--idle-seconds", type=float)
    p.add_argument("--only", choices=["walsync", "litestream"])
    p.add_argument("--dbs", type=int, help="databases for the many-databases RSS run")
    p.add_argument("--write-seconds", type=float, help="length of the RSS runs' writes")
    p.add_argument("--db-mib", type=int, help="size of the snapshot/restore database")
    p.add_argument("--barrier-seconds", type=float, help="length of the barrier run's writes")
    p.add_argument("--skip", action="append", default=[],
                   choices=["size", "rss", "lag", "idle", "snapshot", "barrier", "heavy",
                            "slowdown", "many", "tenants", "pickup"],
                   help="skip a phase")
    p.add_argument("--phase", action="append", default=[],
                   choices=["size", "rss", "lag", "idle", "snapshot", "barrier", "heavy",
                            "slowdown", "many", "tenants", "pickup"],
                   help="run only this phase (repeatable); the others are skipped")
    p.add_argument("--meta", action="append", default=[], help="KEY=VALUE for results.json")
    a = p.parse_args(argv)
    if a.phase:
        a.skip = sorted({"size", "rss", "lag", "idle", "snapshot", "barrier", "heavy",
                         "slowdown", "many", "tenants", "pickup"} - set(a.phase) | set(a.skip))

    quick = a.quick
    if a.idle_seconds is not None and float(a.idle_seconds).is_integer():
        a.idle_seconds = int(a.idle_seconds)
    if a.barrier_seconds is not None and float(a.barrier_seconds).is_integer():
        a.barrier_seconds = int(a.barrier_seconds)
    load_at_start = os.getloadavg()
    params = {
        "quick": quick,
        "idle_seconds": a.idle_seconds if a.idle_seconds is not None else (20 if quick else 600),
        "dbs": a.dbs or (10 if quick else 100),
        "write_seconds": a.write_seconds or (10 if quick else 30),
        "write_interval_s": 0.1,
        # (seconds between commits, commits) for each lag run: sparse, moderate, busy.
        "lag_rates": [(2.0, 5), (0.25, 20), (0.02, 150)] if quick
        else [(2.0, 30), (0.25, 120), (0.02, 1000)],
        "heavy_mib": 10 if quick else 100,
        "heavy_rows_per_txn": 100,
        "heavy_reps": 1 if quick else 5,
        "slowdown_mib": 10 if quick else 60,
        "slowdown_rows_per_txn": 10,
        "slowdown_reps": 1 if quick else 5,
        "many_dbs": [1, 10, 100] if quick else [1, 100, 1000],
        "many_idle_seconds": 10 if quick else 60,
        # Idle databases on one host (walsync; Litestream at the first count only). The
        # largest count that fits this machine's descriptor hard limit (20,000: a database
        # holds up to six while it takes its first snapshot); 10,000 is projected from it.
        "tenant_dbs": [100, 300] if quick else [1000, 3000],
        # Longer than walsync's 30 s before a quiet database rests on one connection.
        "tenant_idle_seconds": 45,
        "pickup_dbs": 20 if quick else 100,
        "db_mib": a.db_mib or (20 if quick else 200),
        "barrier_seconds": a.barrier_seconds or (15 if quick else 60),
        "barrier_interval_s": 0.01,
        "barrier_s3_latency_ms": 200,
    }
    work = a.work
    os.makedirs(work, exist_ok=True)
    children = Children(os.path.join(work, "pids"))

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    writer_py = os.path.abspath(__file__)
    results = {"params": params, "phases": {}}
    notes = []
    try:
        server = Server(children, a.s3_server, work)
        want_w = a.only in (None, "walsync")
        want_l = a.only in (None, "litestream")
        # walsync runs as users run it: the static musl build, like Litestream's release
        # binary. The glibc build (--walsync) only for its size row, or when there is no
        # static build.
        static = a.walsync_static if a.walsync_static and os.path.exists(a.walsync_static) else None
        runs = static or a.walsync
        if want_w:
            log(f"walsync runs as {runs} ({'static musl' if static else 'glibc'} build)")
        results["walsync_binary"] = "static musl" if static else "glibc"
        if want_w:
            notes.append(f"walsync ran as its {results['walsync_binary']} build")
        walsync = Walsync(runs, server, children, work) if want_w else None
        litestream = None
        if want_l:
            if a.litestream and os.path.exists(a.litestream):
                litestream = Litestream(a.litestream, server, children, work)
            else:
                notes.append("litestream not available: its columns are n/a")
                log(notes[-1])
        watch = walsync is not None and walsync.watch_available()
        if walsync is not None and not watch:
            notes.append("walsync watch not available (`walsync watch --help` failed): "
                         "skipping walsync's watch measurements (RSS under writes, lag, idle)")
            log(notes[-1])
        watchers = [t for t in (walsync if watch else None, litestream) if t is not None]
        results["versions"] = {
            "litestream": litestream.version() if litestream else None,
            "walsync_watch": watch,
        }

        ph = results["phases"]
        if "size" not in a.skip:
            ph["binary_size"] = {
                "walsync": stripped_size(a.walsync, work),
                "litestream": stripped_size(a.litestream, work) if a.litestream else None,
            }
            # Litestream's release binary is itself static: the same file in both rows.
            ph["static_binary_size"] = {
                "walsync": os.path.getsize(a.walsync_static)
                if a.walsync_static and os.path.exists(a.walsync_static) else None,
                "litestream": ph["binary_size"]["litestream"],
            }
            log(f"binary sizes (stripped): {ph['binary_size']}")
        if "idle" not in a.skip and watchers:
            ph["idle"] = phase_idle(watchers, server, work, params["idle_seconds"])
        if "rss" not in a.skip:
            for n in (1, params["dbs"]):
                ph[f"rss_{n}db"] = {t.name: phase_rss(t, server, work, n, params["write_seconds"],
                                                      params["write_interval_s"], writer_py)
                                    for t in watchers}
        if "lag" not in a.skip:
            ph["lag"] = {t.name: phase_lag(t, server, work, params["lag_rates"], writer_py)
                         for t in watchers}
        if "heavy" not in a.skip:
            ph["heavy"] = phase_heavy_reps(watchers, server, work, params["heavy_mib"],
                                           params["heavy_rows_per_txn"], writer_py,
                                           params["heavy_reps"])
        if "slowdown" not in a.skip:
            ph["slowdown"] = phase_slowdown(watchers, server, work, params["slowdown_mib"],
                                            params["slowdown_rows_per_txn"], writer_py,
                                            params["slowdown_reps"])
        if "many" not in a.skip:
            for n in params["many_dbs"]:
                ph[f"many_{n}"] = {t.name: phase_many(t, server, work, n,
                                                      params["many_idle_seconds"])
                                   for t in watchers}
        if "tenants" not in a.skip:
            for i, n in enumerate(params["tenant_dbs"]):
                ph[f"tenants_{n}"] = {
                    t.name: phase_tenants(t, server, work, n, params["tenant_idle_seconds"])
                    for t in watchers if t.name == "walsync" or i == 0}
        if "pickup" not in a.skip and walsync in watchers:
            ph["pickup"] = {"walsync": phase_pickup(walsync, server, work,
                                                    params["pickup_dbs"])}
        if "snapshot" not in a.skip:
            ph["snapshot_restore"] = phase_snapshot_restore(walsync, litestream, server, work,
                                                            params["db_mib"])
        if "barrier" not in a.skip:
            ph["barrier"] = phase_barrier([(type(t), t.exe) for t in watchers], a.s3_server,
                                          children, work, params["barrier_seconds"],
                                          params["barrier_interval_s"],
                                          params["barrier_s3_latency_ms"], writer_py)
    finally:
        children.stop_all()

    # Flatten into metrics rows.
    ph = results["phases"]
    metrics = []

    def add(mid, label, unit, get):
        vals = {}
        for tool in ("walsync", "litestream"):
            try:
                vals[tool] = get(tool)
            except (KeyError, TypeError):
                vals[tool] = None
        metrics.append({"id": mid, "label": label, "unit": unit, **vals,
                        "ratio": ratio(vals["walsync"], vals["litestream"])})

    if "binary_size" in ph:
        add("binary_size_bytes", "binary size (stripped)", "bytes", lambda t: ph["binary_size"][t])
        add("static_binary_size_bytes", "binary size, static (walsync: musl)", "bytes",
            lambda t: ph["static_binary_size"][t])
    for key in sorted((k for k in ph if k.startswith("rss_")), key=lambda k: int(k[4:-2])):
        n = int(key[4:-2])
        what = f"{n} db{'s' if n > 1 else ''}"
        add(f"{key}_peak_rss_kib", f"peak RSS, watching {what} under writes", "KiB",
            lambda t, k=key: ph[k][t]["peak_rss_kib"])
        add(f"{key}_cpu_s", f"CPU time, watching {what} under writes", "s",
            lambda t, k=key: ph[k][t]["cpu_s"])
        add(f"{key}_requests", f"S3 requests, watching {what} under writes", "",
            lambda t, k=key: ph[k][t]["requests"])
    if "lag" in ph:
        for interval, _ in params["lag_rates"]:
            key = f"{interval:g}"
            rate = f"1 commit / {interval:g} s" if interval >= 1 else f"{1 / interval:g} commits/s"
            add(f"lag_{key}_p50_ms", f"replication lag p50, {rate}", "ms",
                lambda t, k=key: ph["lag"][t][k]["p50_ms"])
            add(f"lag_{key}_p99_ms", f"replication lag p99, {rate}", "ms",
                lambda t, k=key: ph["lag"][t][k]["p99_ms"])
    if "heavy" in ph:
        h = ph["heavy"]
        what = f"{params['heavy_mib']} MiB in {params['heavy_rows_per_txn']}-row txns"
        add("heavy_cpu_s", f"CPU (user+sys), {what}", "s", lambda t: h[t]["cpu_s"])
        add("heavy_cpu_ms_per_mib", "CPU per MiB written", "ms", lambda t: h[t]["cpu_ms_per_mib"])
        add("heavy_stored_bytes", f"bytes stored, {what}", "bytes", lambda t: h[t]["stored_bytes"])
        add("heavy_peak_rss_kib", f"peak RSS, {what}", "KiB", lambda t: h[t]["peak_rss_kib"])
        add("heavy_catch_up_s", "caught up after the last commit", "s",
            lambda t: h[t]["catch_up_s"])
        add("heavy_writer_wall_s",
            f"app wall time, {what}, median of {params['heavy_reps']} (no replication: "
            f"{h['none']['wall_s']:.2f} s)", "s", lambda t: h[t]["wall_s"])
        for key, which in (("txn_max_ms", "longest"), ("txn_p99_ms", "99th percentile")):
            add(f"heavy_writer_{key}",
                f"app's {which} transaction, {what}, median of {params['heavy_reps']} "
                f"(no replication: {h['none'][key + '_median']:.1f} ms)", "ms",
                lambda t, key=key: h[t][key + "_median"])
    if "slowdown" in ph:
        what = f"{params['slowdown_mib']} MiB in {params['slowdown_rows_per_txn']}-row txns"
        for setting, label in (("default", "app defaults"),
                               ("autocheckpoint_0", "app wal_autocheckpoint=0")):
            sd = ph["slowdown"][setting]
            base = sd["none"]["wall_s"]
            add(f"slowdown_{setting}",
                f"app slowdown, {what}, {label} (no replication: {base:.2f} s = 1.0)", "x",
                lambda t, sd=sd, base=base: round(sd[t]["wall_s"] / base, 3))
    for n in params["many_dbs"]:
        key = f"many_{n}"
        if key not in ph:
            continue
        m = ph[key]
        what = f"{n} idle db{'s' if n > 1 else ''}"
        add(f"{key}_startup_s", f"startup, {what} (each stored, then quiet)", "s",
            lambda t, m=m: m[t]["startup_s"])
        add(f"{key}_idle_rss_kib", f"RSS once idle, {what}", "KiB",
            lambda t, m=m: m[t]["idle_rss_kib"])
        add(f"{key}_idle_requests",
            f"S3 requests, {what}, {params['many_idle_seconds']} s after startup", "",
            lambda t, m=m: m[t]["idle_requests"])
        for t, r in m.items():
            if "error" in r:
                notes.append(f"WARNING: {t}, {what}: {r['error']}")
    for n in params["tenant_dbs"]:
        key = f"tenants_{n}"
        if key not in ph:
            continue
        m = ph[key]
        what = f"{n} idle tenant dbs"

        def get(t, *path, m=m):
            value = m.get(t, {})
            for step in path:
                value = value.get(step) if isinstance(value, dict) else None
            return value

        def per_db(t, *path, m=m, n=n):
            value = get(t, *path, m=m)
            return None if value is None else round(value / n, 2)

        add(f"{key}_first_start_s", f"first start, {what} (each stored, then quiet)", "s",
            lambda t, get=get: get(t, "first_start_s"))
        add(f"{key}_idle_rss_kib", f"RSS once idle, {what}", "KiB",
            lambda t, get=get: get(t, "idle", "rss_kib"))
        add(f"{key}_fds_per_db", f"descriptors per db once idle, {what}", "",
            lambda t, per_db=per_db: per_db(t, "idle", "open_files"))
        add(f"{key}_maps_per_db", f"memory maps per db once idle, {what}", "",
            lambda t, per_db=per_db: per_db(t, "idle", "maps"))
        add(f"{key}_threads", f"threads once idle, {what}", "",
            lambda t, get=get: get(t, "idle", "threads"))
        add(f"{key}_idle_cpu_pct",
            f"CPU once idle, {what}, % of a core over {TENANT_CPU_SECONDS} s", "%",
            lambda t, get=get: get(t, "idle_cpu_pct"))
        add(f"{key}_idle_requests",
            f"S3 requests, {what}, {params['tenant_idle_seconds']} s once stored", "",
            lambda t, get=get: get(t, "idle_requests"))
        add(f"{key}_restart_quiet_s",
            f"restart of {what}: last request (of {RESTART_WINDOW} s watched)", "s",
            lambda t, get=get: get(t, "restart_quiet_s"))
        add(f"{key}_restart_cpu_quiet_s",
            f"restart of {what}: quiet from ({QUIET_SECONDS} s in a row under "
            f"{QUIET_SHARE:.0%} of a core)", "s",
            lambda t, get=get: get(t, "restart_cpu_quiet_s"))
        add(f"{key}_restart_cpu_s", f"restart of {what}: CPU in {RESTART_WINDOW} s", "s",
            lambda t, get=get: get(t, "restart_cpu_s"))
        add(f"{key}_file_restart_cpu_quiet_s", f"restart of {what} over file://: quiet from",
            "s", lambda t, get=get: get(t, "file_restart", "restart_quiet_s"))
        add(f"{key}_file_restart_cpu_s", f"restart of {what} over file://: CPU until quiet",
            "s", lambda t, get=get: get(t, "file_restart", "restart_cpu_s"))
        add(f"{key}_restart_requests_per_db",
            f"restart of {what}: requests per db in {RESTART_WINDOW} s", "",
            lambda t, per_db=per_db: per_db(t, "restart_requests"))
        add(f"{key}_restart_snapshots", f"restart of {what}: snapshots stored", "",
            lambda t, get=get: get(t, "restart_snapshots"))
        for t, r in m.items():
            if "error" in r:
                notes.append(f"WARNING: {t}, {what}: {r['error']}")
            elif r.get("restart_cpu_quiet_s", 0) is None:
                notes.append(f"{t}, {what}: the restart was not quiet within {RESTART_WINDOW} s "
                             f"({QUIET_SECONDS} s in a row under {QUIET_SHARE:.0%} of a core)")
    counts = [n for n in params["tenant_dbs"] if f"tenants_{n}" in ph]
    if len(counts) >= 2 and 10000 not in counts:
        lo, hi = counts[0], counts[-1]

        def projected(t, lo=lo, hi=hi):
            if t != "walsync":
                return None
            a = ph[f"tenants_{lo}"]["walsync"]["idle"]["rss_kib"]
            b = ph[f"tenants_{hi}"]["walsync"]["idle"]["rss_kib"]
            return round(b + (b - a) / (hi - lo) * (10000 - hi))

        add("tenants_10000_idle_rss_kib_projected",
            f"RSS once idle, 10000 idle tenant dbs (PROJECTED from {lo} and {hi})", "KiB",
            projected)
    if "pickup" in ph:
        pk = ph["pickup"]["walsync"]
        add("pickup_p99_s", f"directory pick-up, {pk['dbs']} dbs created while watching, p99",
            "s", lambda t: pk.get("p99_s") if t == "walsync" else None)
        add("pickup_max_s", f"directory pick-up, {pk['dbs']} dbs created while watching, max",
            "s", lambda t: pk.get("max_s") if t == "walsync" else None)
    if "idle" in ph:
        secs = params["idle_seconds"]
        add("idle_requests", f"S3 requests, 1 idle db over {secs:g} s", "",
            lambda t: ph["idle"][t]["requests"])
        add("idle_peak_rss_kib", "peak RSS, 1 idle db", "KiB", lambda t: ph["idle"][t]["peak_rss_kib"])
        if ph["idle"].get("unattributed_requests"):
            notes.append(f"idle: {ph['idle']['unattributed_requests']} requests could not be "
                         "told apart between the tools and are in neither count")
    if "snapshot_restore" in ph:
        sr = ph["snapshot_restore"]
        mib = params["db_mib"]
        add("snapshot_peak_rss_kib", f"peak RSS, snapshot of {mib} MiB db", "KiB",
            lambda t: sr[t]["snapshot"]["maxrss_kib"])
        add("snapshot_wall_s", f"wall time, snapshot of {mib} MiB db", "s",
            lambda t: sr[t]["snapshot"]["wall_s"])
        add("restore_peak_rss_kib", f"peak RSS, restore of {mib} MiB db", "KiB",
            lambda t: sr[t]["restore"]["maxrss_kib"])
        add("restore_wall_s", f"wall time, restore of {mib} MiB db", "s",
            lambda t: sr[t]["restore"]["wall_s"])
        if "litestream" in sr:
            notes.append("snapshot/restore: Litestream has no one-shot snapshot command; its "
                         "column is `litestream replicate -once -force-snapshot` and "
                         "`litestream restore` (nearest equivalents)")
        for t, r in sr.items():
            if not r["restore_matches"]:
                notes.append(f"WARNING: {t}'s restore did not match the source database")
    if "barrier" in ph:
        b = ph["barrier"]
        base = b["none"]
        every = f"1 commit / {b['interval_s'] * 1000:g} ms, S3 +{b['s3_latency_ms']} ms"
        add("barrier_hold_p50_us", f"write lock hold p50 ({every})", "us",
            lambda t: b[t]["hold_p50_us"])
        add("barrier_hold_p99_us", "write lock hold p99", "us", lambda t: b[t]["hold_p99_us"])
        add("barrier_hold_max_us", "write lock hold max", "us", lambda t: b[t]["hold_max_us"])
        add("commit_p99_ms", f"app commit p99 (no replication: {fmt(base['p99_ms'], 'ms1')})",
            "ms1", lambda t: b[t]["p99_ms"])
        add("commit_max_ms", f"app slowest commit (no replication: {fmt(base['max_ms'], 'ms1')})",
            "ms1", lambda t: b[t]["max_ms"])
        add("commit_locked_errors",
            f"app 'database is locked' errors (no replication: {base['locked_errors']})", "",
            lambda t: b[t]["locked_errors"])
        for m in metrics[-3:]:
            m["baseline"] = {"commit_p99_ms": base["p99_ms"], "commit_max_ms": base["max_ms"],
                             "commit_locked_errors": base["locked_errors"]}[m["id"]]
        if "walsync" in b:
            w = b["walsync"]
            notes.append(f"barrier: {b['seconds']:g} s of writes; walsync held the write lock "
                         f"{len(w['holds_us'])} times (start and stop included), checkpoints "
                         f"{w['checkpoints'] or 'none'}; Litestream logs no lock holds (n/a), "
                         "its effect shows in the commit rows")
            if not w["checkpoints"]:
                notes.append("WARNING: barrier: walsync ran no checkpoint during the writes")
        for t in ("none", "walsync", "litestream"):
            if t in b and (b[t]["other_errors"] or b[t]["commits"] < b[t]["attempts"] * 0.9):
                notes.append(f"WARNING: barrier: {t}: {b[t]['commits']} of {b[t]['attempts']} "
                             f"commits succeeded, other errors {b[t]['other_errors']}")
    if "lag" in ph:
        for t, runs in ph["lag"].items():
            for r in runs.values():
                if r["missed"]:
                    notes.append(f"WARNING: {t}: {r['missed']} of {r['commits']} commits "
                                 f"{r['interval_s']:g} s apart not seen stored within 15 s of "
                                 "the last (left out of the lag percentiles)")

    results["metrics"] = metrics
    results["notes"] = notes
    results["meta"] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version()},
        # Other work on the machine skews CPU time and lag: the 1/5/15-minute load averages.
        "loadavg_start": [round(x, 2) for x in load_at_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        **dict(kv.split("=", 1) for kv in a.meta),
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print()
    print(table(metrics, notes))
    print(f"\nresults: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
