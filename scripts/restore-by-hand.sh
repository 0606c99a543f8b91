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
# How it works (the replica layout is described in walsync's src/layout.rs and README):
# object names sort as plain strings in replay order, a snapshot gunzips to a database file,
# and a segment gunzips to a complete WAL file for the database as of the segment before it.
# So: unpack the newest snapshot, then for each later segment of its generation, in order,
# put it beside the database as its -wal file and let sqlite3 checkpoint it in.
set -euo pipefail

die() { echo "restore-by-hand: $*" >&2; exit 1; }

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
next=$(( $(index_of "$snapshot") + 1 ))

tmp="$out.tmp"
cleanup() { rm -f "$tmp" "$tmp-wal" "$tmp-shm"; }
trap cleanup EXIT
cleanup
gunzip -c "$dir/$name/snapshots/$snapshot" > "$tmp"
echo "snapshot $snapshot"

page_size=$(sqlite3 "$tmp" "PRAGMA page_size;")
applied=0
if [ -d "$dir/$name/wal" ]; then
  for f in $(ls "$dir/$name/wal" | grep -E "^$generation-[0-9]{10}-[0-9T.]+Z\.wal\.gz\$" | sort); do
    index=$(index_of "$f")
    # A second segment with the index just applied: walsync stored it, was killed before it
    # noted that, and cut the index again on restart, from the same place and with more in
    # it. The next index follows the later cut, so apply that one on top (it rewrites every
    # page the first one wrote).
    again=0
    [ "$applied" -gt 0 ] && [ "$index" -eq $((next - 1)) ] && again=1
    [ "$index" -lt "$next" ] && [ "$again" -eq 0 ] && continue
    if [ -n "$until" ] && [[ "$(time_of "$f")" > "$until" ]]; then break; fi
    [ "$index" -eq "$next" ] || [ "$again" -eq 1 ] || die "segment $next of generation $generation is missing (found $f)"
    gunzip -c "$dir/$name/wal/$f" > "$tmp-wal"
    rm -f "$tmp-shm"
    frames=$(( ($(stat -c %s "$tmp-wal") - 32) / (24 + page_size) ))
    # Opening the database recovers the WAL; the checkpoint copies its pages in. It answers
    # busy|frames in the WAL|frames checkpointed: all of the segment's frames must be there.
    result=$(sqlite3 "$tmp" "PRAGMA wal_checkpoint;")
    [ "$result" = "0|$frames|$frames" ] || die "checkpoint of $f failed: got $result, expected 0|$frames|$frames"
    [ "$again" -eq 1 ] || next=$((next + 1)) applied=$((applied + 1))
  done
fi
rm -f "$tmp-wal" "$tmp-shm"

check=$(sqlite3 "$tmp" "PRAGMA integrity_check;")
[ "$check" = "ok" ] || die "integrity check failed: $check"
mv "$tmp" "$out"
trap - EXIT
echo "restored $name to $out from generation $generation ($applied segments)"
