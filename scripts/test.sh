#!/usr/bin/env bash
# Every check CI runs, and what they need on a fresh machine: format, lints, the FreeBSD
# (kqueue) build, then all the tests. The tests start their own S3 server (s3s-fs, in
# process, SigV4 checked: the test kit's, testkit/) on a loopback port: nothing else needs to
# be running.
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
if ! need sqlite3 || ! need gunzip || ! need chattr || ! need faketime || ! need jq ||
  ! need runsvdir || ! need s6-svscan; then
  # The emergency-restore script is tested with the real sqlite3 and gunzip; a read-only
  # directory is made with chattr (root ignores permission bits); the torture harness steps
  # walsync's clock back with libfaketime; README's status snippet uses jq; contrib's
  # service directories run under the real runsvdir/runsv (runit) and s6-svscan/s6-supervise
  # (s6). Installing runit and s6 only adds their tools: neither becomes the init system.
  sudo=; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq sqlite3 gzip e2fsprogs faketime jq runit s6 >/dev/null
fi
# The harness finds the library itself; without it, it skips the clock step and says so.
if ! dpkg -L libfaketime 2>/dev/null | grep -q '/libfaketime\.so\.1$'; then
  echo "test.sh: libfaketime.so.1 not found; the torture harness will skip the clock step" >&2
fi
rustup component add rustfmt clippy
rustup target add x86_64-unknown-freebsd

cargo fmt --check
# The service scripts in contrib/ are plain POSIX sh.
for script in contrib/runit/walsync/run contrib/runit/walsync/log/run contrib/s6/*/run \
  contrib/s6/*/log/run; do
  sh -n "$script"
done
# --workspace: the test kit (testkit/) too, whose programs no test builds.
cargo clippy --locked --workspace --all-targets -- -D warnings
# SQLite is not bundled here, so no C cross-compiler is needed to type-check for FreeBSD.
cargo check --locked --target x86_64-unknown-freebsd --no-default-features --features cli
# An embedding application compiles the library without the binary's dependencies
# (`default-features = false`): it must build without them.
cargo check --locked --lib --no-default-features
# The API documentation builds without warnings (a broken intra-doc link is one), and the
# library and the binary build with the oldest Rust that Cargo.toml promises (rust-version;
# the dev-dependencies may need a newer one, so no tests there).
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --lib
msrv=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
rustup toolchain install "$msrv" --profile minimal
cargo "+$msrv" check --locked --lib --bins
cargo test --locked --workspace
# The static binary users install stays within its size budget (installs musl-tools if
# needed). A release build of its own, sharing nothing with the test build: 90 s on the
# 2-core machine with every target crate cold (the host's build scripts and proc macros
# were built already), so somewhat more on a fresh machine.
scripts/build-static.sh --check
