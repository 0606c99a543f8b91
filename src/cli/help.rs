//! `walsync help [COMMAND]`: a manual page per command, kept in this one place. The
//! README says the same at more length. The flags, variables and defaults are those of the
//! table in `settings.rs`, whose tests check every page against it (and `tests/ops/help.rs`
//! that each page names every flag the command's `--help` lists).
//!
//! argh treats a `help` argument as `--help`, so `main` intercepts `walsync help ...`
//! before argh sees it.

/// The options every command that talks to storage takes.
macro_rules! storage_options {
    () => {
        "    -b, --bucket DEST
        Destination: s3://bucket/prefix or file:///some/dir (or WALSYNC_BUCKET).

    --endpoint URL
        S3 endpoint URL, with path-style addressing (or WALSYNC_ENDPOINT, else
        AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL; without one, AWS with
        virtual-hosted-style URLs).

    --s3-timeout SECS
        How long one S3 read or write may wait before that request fails and is
        retried (default 60; or WALSYNC_S3_TIMEOUT).

    -v, --verbose
        Log more (debug level); RUST_LOG overrides. Accepted before or after the command.

    --no-log-timestamps
        Log lines without their leading UTC time (RFC 3339 with milliseconds), for
        loggers that add their own such as svlogd -tt or s6-log T (or
        WALSYNC_LOG_TIMESTAMPS=0).
"
    };
}

/// What `walsync prune` keeps and deletes: the DESCRIPTION of `walsync help prune` and the
/// note of `walsync prune --help` (see `args.rs`), so the two say one rule.
macro_rules! prune_rule {
    () => {
        "For each database (every one under the destination, or those named), with
    W = now - DURATION: keeps the snapshot a restore to W starts from, every snapshot
    after it and the segments they need, and always the newest snapshot and everything
    after it, whatever the clock says. Deletes older snapshots, the segments only they
    need, and older generations, snapshots first, then segments, oldest first, so an
    interrupted prune leaves every kept point restorable. Never state.json, nor keys
    walsync did not write. One LIST, then batched deletes (S3 DeleteObjects, 1000 keys a
    request); then, for each database pruned, one listing of the multipart uploads a
    crash left unfinished, aborting those over a day old. Safe beside a running walsync
    watch, which only adds newer objects."
    };
}

/// The rule, for `main.rs` to put into `walsync prune --help`.
pub const PRUNE_RULE: &str = prune_rule!();

/// The environment every command that talks to storage reads.
macro_rules! storage_environment {
    () => {
        "    WALSYNC_BUCKET, WALSYNC_ENDPOINT, WALSYNC_S3_TIMEOUT
        As -b, --endpoint and --s3-timeout. A flag always wins; an empty variable
        counts as unset; a value that does not parse is an error naming the variable.

    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
    AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL
        Credentials (never logged), region (AWS_REGION, else AWS_DEFAULT_REGION, else
        the profile's, else us-east-1) and endpoint.
        Without keys, the AWS SDKs' chain: AWS_PROFILE and ~/.aws (keys,
        credential_process), web identity, container credentials, the EC2
        instance role (IMDSv2).

    WALSYNC_S3_ADDRESSING
        virtual or path (default: virtual for AWS, path for an endpoint).

    AWS_CA_BUNDLE, SSL_CERT_FILE, SSL_CERT_DIR
        Roots for TLS (default: the system's store, else built-in roots).

    RUST_LOG
        Log filter (walsync -v: debug level).

    WALSYNC_LOG_TIMESTAMPS
        0 logs lines without their leading UTC time (as --no-log-timestamps); 1, the
        default, with it. Messages go to stderr, a command's results to stdout.
"
    };
}

macro_rules! exit_status {
    () => {
        "EXIT STATUS
    0  success, also when --if-db-not-exists or --if-replica-exists had nothing to do
    1  any other error (local I/O, SQLite, an unexpected storage response)
    2  usage: bad or unknown flags, a bad value, a missing setting, or input the
       command refuses
    3  not found: no such replica, generation or backup, or a missing database file
    4  corrupt or unverifiable backup data
    5  storage unreachable, credentials refused, or storage errors that outlasted
       the retries
"
    };
}

const WATCH: &str = concat!(
    "NAME
    walsync watch - replicate SQLite databases continuously

SYNOPSIS
    walsync watch [DB[:NAME]...] [--dir DIR...] [--pattern GLOB] [--recursive] -b DEST
        [--min-interval SECS] [--snapshot-interval SECS]
        [--upload-workers N] [--poll] [--shutdown-timeout SECS] [--staging-limit MIB]
        [--retention DURATION] [--metrics-addr ADDR] [--heartbeat-url URL]
        [--heartbeat-interval SECS] [--heartbeat-max-lag SECS] [--exec CMD]

DESCRIPTION
    Replicates every named database (each must be in WAL mode) until SIGTERM or SIGINT,
    one thread per database, woken by inotify or kqueue (or stat polling with --poll).
    New commits are cut into segments, staged in the sidecar directory .DB-walsync/ and
    uploaded in order by a small pool of workers; failed uploads are retried with backoff
    forever. walsync runs the checkpoints itself and takes the application's write lock
    only for milliseconds of local work. A snapshot is taken every --snapshot-interval
    while a database changes. On SIGTERM or SIGINT it ships what is committed (within
    --shutdown-timeout) and exits 0; SIGHUP, SIGUSR1 and SIGUSR2 are logged and change
    nothing. With --exec it runs CMD, forwards those signals and SIGQUIT to it, and when
    it exits ships what is left and exits with its status. A replica name defaults to the file name without its
    extension (characters other than letters, digits, '.', '_' and '-' become '_');
    PATH:NAME names it explicitly. \"watching PATH as NAME\" is logged for each database.

    With --dir, every WAL database in DIR whose file name matches --pattern (and with
    --recursive, in its subdirectories) is replicated too, as databases come and go:
    new ones (created, restored into place, moved in) are picked up within 2 s of
    becoming WAL databases; one deleted or moved out is let go of (what it staged is
    uploaded first, within --shutdown-timeout) and its replica stays in storage. Its
    name is its path relative to DIR without the extension, '/' written as '.' and a
    '.' inside a name doubled: tenant-a/app.db is tenant-a.app, example.com/app.db is
    example..com.app. Names starting with '.', ending in .tmp, and SQLite's -wal, -shm
    and -journal files never match. A matching file that is not a WAL database is
    skipped with one warning, and picked up once it becomes one. Two files that would
    share a name (or one that a named database has): the second is refused with a
    warning.

OPTIONS
",
    storage_options!(),
    "
    --dir DIR
        Also replicate the WAL databases in DIR, as they come and go (repeatable).

    --pattern GLOB
        Which file names in a --dir are databases (default *.db): * (any run of
        characters), ? (any one), [...] (one of those listed, ranges such as [a-z];
        [!...] none of them).

    --recursive
        Search the subdirectories of each --dir too (not those whose names start with
        '.'; symbolic links to directories are not followed).

    --min-interval SECS
        Under steady writes, ship each database at most this often (default 1). The first
        commit after a quiet spell ships at once, and a WAL holding 2000 frames not yet read
        ships and is checkpointed at once, so that it can restart as SQLite would restart it.

    --snapshot-interval SECS
        Seconds between snapshots of a changing database (default 3600).

    --upload-workers N
        Upload workers shared by all databases (default 2).

    --poll
        Poll files for changes instead of using inotify/kqueue.

    --shutdown-timeout SECS
        Seconds to keep uploading after SIGTERM/SIGINT before giving up (default 30);
        what is still staged then is uploaded on the next start.

    --staging-limit MIB
        Local disk each database may fill with staged segments while storage is slow or
        down (default 1024); past it the WAL stays pinned and grows instead.

    --retention DURATION
        Keep every point in time this far back restorable and delete the backups no such
        restore needs: at start, after stored snapshots (at most hourly), and when the
        window passes the next snapshot (default 24h; 0 keeps everything). See walsync
        help prune for the rule.

    --metrics-addr ADDR
        Serve Prometheus metrics on http://ADDR/metrics, e.g. 127.0.0.1:9091: per database
        (label db) the replication lag, the newest stored commit time, bytes and objects
        stored, upload errors and retries, checkpoints, and staged bytes and objects.
        Other paths answer 404. An address that cannot be bound is a startup error.

    --heartbeat-url URL
        GET this URL at most once per --heartbeat-interval, and only while every
        database's lag (the age of its oldest commit not yet stored, whatever holds it
        back: storage, the sidecar's disk, the staging limit) is under --heartbeat-max-lag:
        for a dead man's switch monitor such as healthchecks.io. Failures are logged as
        warnings and never stop replication; logs name only the URL's scheme and host.

    --heartbeat-interval SECS
        Seconds between heartbeats (default 60).

    --heartbeat-max-lag SECS
        No heartbeat while a database's lag is this long or longer (default 5
        --min-intervals, at least 5 seconds).

    --exec CMD
        Once replication has started, run CMD and when it exits ship what is left and
        exit with its status (128 + the signal number if a signal killed it). CMD starts
        with an empty signal mask and default signal dispositions. Without shell syntax
        (quotes, $, ;, &, |, <, >, globs, VAR=value, ...) it is executed directly, split
        on whitespace, and SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to
        walsync are forwarded to it; otherwise it runs through /bin/sh -c in a process
        group of its own, and the signals go to that group.

ENVIRONMENT
",
    storage_environment!(),
    "
    WALSYNC_MIN_INTERVAL, WALSYNC_SNAPSHOT_INTERVAL, WALSYNC_UPLOAD_WORKERS,
    WALSYNC_SHUTDOWN_TIMEOUT, WALSYNC_STAGING_LIMIT, WALSYNC_RETENTION,
    WALSYNC_METRICS_ADDR, WALSYNC_HEARTBEAT_URL, WALSYNC_HEARTBEAT_INTERVAL,
    WALSYNC_HEARTBEAT_MAX_LAG, WALSYNC_EXEC
        As the flags of the same name.

    WALSYNC_DATABASES
        The databases to replicate when none are given as arguments: PATH or PATH:NAME,
        separated by whitespace (for service files; a path with blanks must be an
        argument).

    WALSYNC_DIR, WALSYNC_PATTERN, WALSYNC_RECURSIVE
        --dir when none is given (directories separated by whitespace), --pattern, and
        --recursive (1, or 0 for not).

",
    exit_status!(),
    "    With --exec: the command's exit status, unless shipping what is left fails.

EXAMPLES
    walsync watch /srv/app/app.db /srv/blog/blog.db:blog -b s3://backups/host1

    walsync watch --dir /var/lib/app --recursive -b s3://backups/tenants

    walsync watch app.db -b s3://backups/app --metrics-addr 127.0.0.1:9091 \\
        --heartbeat-url https://hc-ping.com/UUID --heartbeat-interval 300

    exec walsync watch /data/app.db -b s3://bucket/prefix --exec \"myapp --db /data/app.db\"
"
);

const SNAPSHOT: &str = concat!(
    "NAME
    walsync snapshot - store a full snapshot of a database now

SYNOPSIS
    walsync snapshot DB -b DEST [--name NAME]

DESCRIPTION
    Takes a consistent snapshot through SQLite's backup API, gzips it into the sidecar
    and uploads it. Commits not yet shipped as segments are shipped first, so the
    snapshot is aligned to a segment boundary. Starts a new generation if the database
    has none (or if its WAL changed while walsync was not holding it). Prints the
    snapshot's key. Refused while walsync watch replicates the same database to the same
    destination (use --snapshot-interval, or Replicator::snapshot in the library). On a
    terminal, progress (bytes and objects done) is shown on stderr.

OPTIONS
",
    storage_options!(),
    "
    --name NAME
        Replica name (default: the file name without its extension).

ENVIRONMENT
",
    storage_environment!(),
    "
",
    exit_status!(),
    "
EXAMPLES
    walsync snapshot /srv/app/app.db -b s3://backups/host1
"
);

const LIST: &str = concat!(
    "NAME
    walsync list - list the databases backed up under a destination

SYNOPSIS
    walsync list -b DEST [--json]

DESCRIPTION
    Every database under the destination, its generations, snapshot and segment counts,
    newest snapshot and segment times, and sizes.

OPTIONS
",
    storage_options!(),
    "
    --json
        Print JSON, a stable format for scripts (fields are only ever added).

ENVIRONMENT
",
    storage_environment!(),
    "
",
    exit_status!(),
    "
EXAMPLES
    walsync list -b s3://backups/host1 --json | jq '.databases[].name'
"
);

const STATUS: &str = concat!(
    "NAME
    walsync status - show how fresh each replica is

SYNOPSIS
    walsync status -b DEST [--json] [NAME...]

DESCRIPTION
    For each database (every one under the destination, or those named), the newest
    stored commit time, its age in seconds, and the newest generation with its snapshot
    and segment counts and bytes. One LIST, no GETs: cheap enough for a monitoring check.
    The age is that of the newest commit stored: an idle database ages too. For a running
    walsync watch, --metrics-addr and --heartbeat-url tell the same from the inside.

OPTIONS
",
    storage_options!(),
    "
    --json
        Print JSON, a stable format for scripts (fields are only ever added).

    NAME...
        Replica names, as walsync list shows them (default: every database).

ENVIRONMENT
",
    storage_environment!(),
    "
",
    exit_status!(),
    "    3 also when a NAME has no replica.

EXAMPLES
    if json=$(walsync status app --json); then
      age=$(printf '%s' \"$json\" | jq '.databases[0].age_seconds')
      [ \"$age\" -lt 600 ] || echo \"app: nothing stored for ${age}s\"
    else
      echo \"app: walsync status failed (exit $?; its error is above)\"
    fi
"
);

const RESTORE: &str = concat!(
    "NAME
    walsync restore - restore a database from its replica

SYNOPSIS
    walsync restore NAME -o OUT -b DEST [--point-in-time RFC3339] [--generation ID]
        [--force] [--if-db-not-exists] [--if-replica-exists] [--dry-run] [--parallel N]
        [--mode OCTAL]

DESCRIPTION
    Plans from one LIST, downloads in parallel, verifies every object (gzip CRC, WAL
    salts and checksums, contiguous indexes, the chain from the snapshot through each
    segment), applies pages to OUT.tmp, fsyncs, runs PRAGMA integrity_check, removes
    stale OUT-wal and OUT-shm and renames into place. A failed restore leaves nothing at
    OUT. On a terminal, progress (bytes and objects downloaded) is shown on stderr.

OPTIONS
    NAME
        Replica name, as walsync list shows it.

    -o, --output OUT
        The restored database file.

",
    storage_options!(),
    "
    --point-in-time RFC3339
        Restore the state as of this time, e.g. 2026-01-10T12:00:00Z.

    --generation ID
        Restore from this generation (16 hex digits, as walsync list shows it) instead of
        the newest.

    --force
        Replace OUT if it exists.

    --if-db-not-exists
        Do nothing (exit 0) if OUT already exists, without touching storage.

    --if-replica-exists
        Do nothing (exit 0) if the destination holds no replica of NAME.

    --dry-run
        Print the plan (generation, keys and sizes, the time restored to) and exit
        without downloading or writing anything.

    --parallel N
        Downloads in flight at once (default 4).

    --mode OCTAL
        Permission bits of the restored file, less the umask (default 0600).

ENVIRONMENT
",
    storage_environment!(),
    "
",
    exit_status!(),
    "
EXAMPLES
    walsync restore app -o restored.db -b s3://backups/host1
    walsync restore app -o restored.db -b s3://backups/host1 \\
        --point-in-time 2026-01-10T12:00:00Z
    walsync restore app -o /data/app.db --if-db-not-exists --if-replica-exists
"
);

const PRUNE: &str = concat!(
    "NAME
    walsync prune - delete the backups no restore inside the retention window needs

SYNOPSIS
    walsync prune -b DEST --retention DURATION [--dry-run] [NAME...]

DESCRIPTION
    ",
    prune_rule!(),
    "
    walsync watch --retention does the same as it runs.

OPTIONS
",
    storage_options!(),
    "
    --retention DURATION
        How far back every point in time stays restorable: 3600s, 90m, 24h, 7d, 1.5h (a
        plain number is seconds); 0 keeps everything. Required (or WALSYNC_RETENTION).

    --dry-run
        Print each key that would be deleted with its size, and the bytes freed; delete
        nothing.

    NAME...
        Replica names, as walsync list shows them (default: every database).

ENVIRONMENT
",
    storage_environment!(),
    "
    WALSYNC_RETENTION
        As --retention.

",
    exit_status!(),
    "    3 also when a NAME has no replica (checked before anything is deleted).

EXAMPLES
    walsync prune -b s3://backups/host1 --retention 7d --dry-run
    walsync prune -b s3://backups/host1 --retention 7d app
"
);

const HELP: &str = "NAME
    walsync help - show the manual page of a command

SYNOPSIS
    walsync help [COMMAND]

DESCRIPTION
    Without COMMAND, lists the commands. walsync COMMAND --help gives a short summary
    of a command's flags instead.
";

/// Every command's page, in the order `walsync help` lists them, with a one-line summary.
pub const PAGES: &[(&str, &str, &str)] = &[
    ("watch", "replicate SQLite databases continuously", WATCH),
    (
        "snapshot",
        "store a full snapshot of a database now",
        SNAPSHOT,
    ),
    (
        "list",
        "list the databases backed up under a destination",
        LIST,
    ),
    ("status", "show how fresh each replica is", STATUS),
    ("restore", "restore a database from its replica", RESTORE),
    (
        "prune",
        "delete the backups no restore inside the retention window needs",
        PRUNE,
    ),
    ("help", "show the manual page of a command", HELP),
];

/// `walsync help` with no command: the list of commands.
pub fn index() -> String {
    let mut out = String::from(
        "walsync: back up SQLite databases in WAL mode to S3-compatible storage, and \
         restore them.\n\nUsage: walsync [-v] COMMAND [ARGS]\n\nCommands:\n",
    );
    for (name, summary, _) in PAGES {
        out.push_str(&format!("    {name:<10}{summary}\n"));
    }
    out.push_str(
        "\nwalsync help COMMAND shows a command's manual page; walsync COMMAND --help its \
         flags;\nwalsync --help the global flags and exit codes.\n",
    );
    out
}

/// The manual page of `command`, if there is one.
pub fn page(command: &str) -> Option<&'static str> {
    PAGES
        .iter()
        .find(|(name, _, _)| *name == command)
        .map(|(_, _, text)| *text)
}
