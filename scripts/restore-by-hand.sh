#!/usr/bin/env bash
# Emergency restore without walsync: rebuild a database from a replica using only gunzip and
# sqlite3 (and coreutils).
#
#   scripts/restore-by-hand.sh REPLICA_DIR NAME OUTPUT [UNTIL]
#
# REPLICA_DIR  a file:// destination's directory, or a folder of downloaded objects laid out
#              as in the bucket: REPLICA_DIR/NAME/snapshots/*.db.gz and REPLICA_DIR/NAME/wal/*.wal.gz
#              (e.g. `aws s3 cp --recursive s3://bucket/prefix/NAME REPLICA_DIR/NAME`)
# NAME         the replica name
# OUTPUT       the database file to create (must not exist)
# UNTIL        optional: a UTC time in the object names' spelling, e.g. 20260110T120000.000Z;
#              the newest snapshot taken at or before it, and segments up to it, are used
#
# How it works (the replica format is specified in walsync's docs/FORMAT.md, which this
# script follows): object names sort as plain strings in replay order, a snapshot gunzips to
# a database file, and a segment gunzips to a complete WAL file for the database as of the
# object before it. So: unpack the newest snapshot, then for each later segment of its
# generation, in order, put it beside the database as its -wal file and let sqlite3
# checkpoint it in. On the way it checks the chain (FORMAT.md, "The chain": the snapshot's
# gzip comment, each segment's WAL salts, the checksum of its last frame) and chooses among
# duplicate cuts of an index as walsync restore does; a break stops it with an error. With
# UNTIL it takes the time labels at face value, without walsync restore's allowances for a
# clock that stepped (FORMAT.md, "Restoring").
set -euo pipefail

die() { echo "restore-by-hand: $*" >&2; exit 1; }
warn() { echo "restore-by-hand: warning: $*" >&2; }

[ $# -ge 3 ] && [ $# -le 4 ] || die "usage: $0 REPLICA_DIR NAME OUTPUT [UNTIL]"
dir=$1 name=$2 out=$3 until=${4:-}
command -v gunzip >/dev/null || die "gunzip is not installed"
command -v sqlite3 >/dev/null || die "sqlite3 is not installed"
[ -d "$dir/$name/snapshots" ] || die "no snapshots in $dir/$name/snapshots"
[ -e "$out" ] && die "$out already exists"

# Fields of an object file name: <generation>-<index>-<time>.<ext>.gz
generation_of() { local f=${1##*/}; echo "${f%%-*}"; }
index_of() { local f=${1##*/}; f=${f#*-}; echo $((10#${f%%-*})); }
time_of() { local f=${1##*/}; f=${f#*-*-}; echo "${f%.*.gz}"; }
in_time() { [ -z "$until" ] || ! [[ "$(time_of "$1")" > "$until" ]]; }

# The 8 bytes at offset $2 of file $1 as a chain value: two big-endian words in hex.
words_at() {
  local hex
  hex=$(od -An -tx1 -j"$2" -N8 "$1" | tr -d ' \n')
  [ ${#hex} -eq 16 ] || die "$1: cannot read 8 bytes at offset $2"
  echo "${hex:0:8}-${hex:8:8}"
}

# The chain value in a snapshot's gzip header comment; nothing for a legacy snapshot. walsync
# sets only the comment flag (0x10 in byte 3), so the comment starts at byte 10, NUL-ended.
snapshot_chain() {
  local flags comment
  flags=$(od -An -tu1 -j3 -N1 "$1" | tr -d ' \n')
  [ -n "$flags" ] || die "$1 is not a gzip file"
  if (( (flags & 16) == 0 )); then return 0; fi
  if (( flags & 12 )); then die "$1: gzip header has a file name or extra field, not written by walsync"; fi
  comment=$(head -c 74 "$1" | tail -c +11 | tr '\0' '\n' | head -n 1)
  [[ $comment =~ ^walsync-chain=([0-9a-f]{8}-[0-9a-f]{8})$ ]] || die "$1: gzip comment '$comment' is not a walsync chain value"
  echo "${BASH_REMATCH[1]}"
}

# Frames in an unpacked segment, insisting that it is a WAL header and whole frames.
frames_in() {
  local size frames
  size=$(stat -c %s "$1")
  frames=$(( (size - 32) / (24 + page_size) ))
  [ "$frames" -ge 1 ] && [ $(( 32 + frames * (24 + page_size) )) -eq "$size" ] \
    || die "$2 is not a whole WAL of $page_size-byte pages"
  echo "$frames"
}

# The chain value after an unpacked segment: the checksum in its last frame header.
chain_after() {
  local size
  size=$(stat -c %s "$1")
  words_at "$1" $(( size - 24 - page_size + 16 ))
}

# The newest snapshot (at or before UNTIL): names sort by generation, then index.
snapshot=
for f in $(ls "$dir/$name/snapshots" | grep -E '^[0-9a-f]{16}-[0-9]{10}-[0-9T.]+Z\.db\.gz$' | sort); do
  if [ -n "$until" ] && [[ "$(time_of "$f")" > "$until" ]]; then continue; fi
  if [ -z "$until" ] || [ -z "$snapshot" ] || [[ "$(time_of "$f")" > "$(time_of "$snapshot")" ]]; then
    snapshot=$f
  fi
done
[ -n "$snapshot" ] || die "no usable snapshot of $name"
generation=$(generation_of "$snapshot")
snapshot_index=$(index_of "$snapshot")
next=$(( snapshot_index + 1 ))

tmp="$out.tmp"
cleanup() { rm -f "$tmp" "$tmp-wal" "$tmp-shm" "$tmp-cut"; }
trap cleanup EXIT
cleanup
umask 077
gunzip -c "$dir/$name/snapshots/$snapshot" > "$tmp"
echo "snapshot $snapshot"

# `expected` is the chain value after what is applied so far; empty: an unchained generation.
expected=$(snapshot_chain "$dir/$name/snapshots/$snapshot")
if [ -z "$expected" ]; then
  echo "no chain value in $snapshot (written before walsync chained segments): not checked"
elif [ "$snapshot_index" -eq 0 ] && [ "$expected" != "${generation:0:8}-${generation:8:8}" ]; then
  die "$snapshot carries chain value $expected, but its generation's is ${generation:0:8}-${generation:8:8}"
fi
previous=$snapshot

page_size=$(sqlite3 "$tmp" "PRAGMA page_size;")
segments=()
if [ -d "$dir/$name/wal" ]; then
  segments=($(ls "$dir/$name/wal" | grep -E "^$generation-[0-9]{10}-[0-9T.]+Z\.wal\.gz\$" | sort || true))
fi
# Cuts of the index before that were not applied (at first, the snapshot's own index): what
# an abandoned branch continues.
set_aside=()
i=0
while [ "$i" -lt "${#segments[@]}" ] && [ "$(index_of "${segments[$i]}")" -le "$snapshot_index" ]; do
  f=${segments[$i]}
  if [ "$(index_of "$f")" -eq "$snapshot_index" ] && in_time "$f"; then set_aside+=("$f"); fi
  i=$((i + 1))
done

applied=0
while [ "$i" -lt "${#segments[@]}" ]; do
  # The cuts of the next index within UNTIL, oldest first.
  index=$(index_of "${segments[$i]}")
  cuts=()
  while [ "$i" -lt "${#segments[@]}" ] && [ "$(index_of "${segments[$i]}")" -eq "$index" ]; do
    if in_time "${segments[$i]}"; then cuts+=("${segments[$i]}"); fi
    i=$((i + 1))
  done
  [ "${#cuts[@]}" -gt 0 ] || break
  [ "$index" -eq "$next" ] || die "segment $next of generation $generation is missing (found ${cuts[0]})"

  # Choose: the newest cut that continues the chain (unchained: the newest).
  chosen= skipped=()
  for (( k = ${#cuts[@]} - 1; k >= 0; k-- )); do
    gunzip -c "$dir/$name/wal/${cuts[$k]}" > "$tmp-wal"
    frames_in "$tmp-wal" "${cuts[$k]}" >/dev/null
    salts=$(words_at "$tmp-wal" 16)
    if [ -z "$expected" ] || [ "$salts" = "$expected" ]; then chosen=${cuts[$k]}; break; fi
    skipped+=("${cuts[$k]}")
  done

  if [ -z "$chosen" ]; then
    # No cut continues the chain: an abandoned branch only if each continues a set-aside cut.
    ends=" "
    for f in "${set_aside[@]}"; do
      gunzip -c "$dir/$name/wal/$f" > "$tmp-cut"
      frames_in "$tmp-cut" "$f" >/dev/null
      ends+="$(chain_after "$tmp-cut") "
    done
    for f in "${cuts[@]}"; do
      gunzip -c "$dir/$name/wal/$f" > "$tmp-cut"
      salts=$(words_at "$tmp-cut" 16)
      [[ "$ends" == *" $salts "* ]] || die "$f does not continue $previous: its WAL salts are $salts, but the chain value after $previous is $expected; it belongs to another history"
    done
    ignored=("${cuts[@]}")
    for f in "${segments[@]:$i}"; do if in_time "$f"; then ignored+=("$f"); fi; done
    warn "restoring only up to $previous: the later segments continue a branch the writer abandoned, ignored: ${ignored[*]}"
    break
  fi

  for f in "${skipped[@]}"; do warn "ignoring $f: it does not continue $previous; using $chosen"; done
  frames=$(frames_in "$tmp-wal" "$chosen")
  # Read before sqlite3 runs: closing the database checkpoints and deletes the -wal file.
  after=$(chain_after "$tmp-wal")
  rm -f "$tmp-shm"
  # Opening the database recovers the WAL; the checkpoint copies its pages in. It answers
  # busy|frames in the WAL|frames checkpointed: all of the segment's frames must be there
  # (sqlite3 verifies each frame's salts and checksum, so the chain value after it holds).
  result=$(sqlite3 "$tmp" "PRAGMA wal_checkpoint;")
  [ "$result" = "0|$frames|$frames" ] || die "checkpoint of $chosen failed: got $result, expected 0|$frames|$frames"
  set_aside=()
  for f in "${cuts[@]}"; do if [ "$f" != "$chosen" ]; then set_aside+=("$f"); fi; done
  [ -z "$expected" ] || expected=$after
  previous=$chosen next=$((next + 1)) applied=$((applied + 1))
done
rm -f "$tmp-wal" "$tmp-shm" "$tmp-cut"

check=$(sqlite3 "$tmp" "PRAGMA integrity_check;")
[ "$check" = "ok" ] || die "integrity check failed: $check"
mv "$tmp" "$out"
trap - EXIT
echo "restored $name to $out from generation $generation ($applied segments)"
