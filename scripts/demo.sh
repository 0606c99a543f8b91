#!/usr/bin/env bash
# A walsync round trip on this machine, no S3 needed: back up a small SQLite database to a
# file:// destination, list it, restore it, and compare.
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

rm -f "$db" "$db-wal" "$db-shm" "$work/restored.db"
sqlite3 "$db" "PRAGMA journal_mode=WAL;" >/dev/null
sqlite3 "$db" "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT);
  WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)
  INSERT INTO notes(body) SELECT 'note ' || i FROM n;"

echo "== snapshot $db -> $dest"
"$walsync" snapshot "$db" -b "$dest"
echo "== list"
"$walsync" list -b "$dest"
echo "== restore"
"$walsync" restore app -o "$work/restored.db" -b "$dest"
before=$(sqlite3 "$db" "SELECT count(*), sum(length(body)) FROM notes;")
after=$(sqlite3 "$work/restored.db" "SELECT count(*), sum(length(body)) FROM notes;")
echo "source:   $before"
echo "restored: $after"
[ "$before" = "$after" ] && echo "demo: OK (files in $work)"
