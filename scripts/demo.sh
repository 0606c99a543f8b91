#!/usr/bin/env bash
# walsync's main job on this machine, no S3 needed: watch a SQLite database while it is
# written, replicating to a file:// destination, then stop it, restore, and compare.
#
#   scripts/demo.sh [WORK_DIR]     (default: a new temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v sqlite3 >/dev/null || { echo "demo: needs sqlite3 (apt-get install sqlite3)" >&2; exit 1; }

work=${1:-$(mktemp -d)}
mkdir -p "$work"
cargo build --release --quiet
walsync=$PWD/target/release/walsync
db=$work/app.db
dest=file://$work/replica

rm -rf "$db" "$db-wal" "$db-shm" "$work/restored.db" "$work/replica" "$work/.app.db-walsync"
sqlite3 "$db" "PRAGMA journal_mode=WAL;
  CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT);
  WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)
  INSERT INTO notes(body) SELECT 'note ' || i FROM n;" >/dev/null

echo "== walsync watch $db -b $dest"
"$walsync" watch "$db" -b "$dest" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
sleep 1
for i in $(seq 1 20); do
  sqlite3 "$db" "INSERT INTO notes(body) VALUES ('written while watched $i');"
  sleep 0.1
done
sleep 1.5
echo "== SIGTERM"
kill -TERM $pid
wait $pid
trap - EXIT

echo "== walsync list"
"$walsync" list -b "$dest"
echo "== walsync restore"
"$walsync" restore app -o "$work/restored.db" -b "$dest"
before=$(sqlite3 "$db" "SELECT count(*), sum(length(body)) FROM notes;")
after=$(sqlite3 "$work/restored.db" "SELECT count(*), sum(length(body)) FROM notes;")
echo "source:   $before"
echo "restored: $after"
[ "$before" = "$after" ] || { echo "demo: MISMATCH" >&2; exit 1; }
echo "demo: OK (files in $work)"
