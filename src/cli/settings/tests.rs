//! The table's tests: its defaults against the code's, and argh's flags, the manual pages
//! (src/cli/help.rs) and README's table of settings against it.

use super::*;
use argh::FromArgs;
use std::collections::BTreeSet;

/// The commands' names, with their bits.
const COMMANDS: [(&str, Commands); 6] = [
    ("watch", WATCH),
    ("snapshot", SNAPSHOT),
    ("list", LIST),
    ("status", STATUS),
    ("restore", RESTORE),
    ("prune", PRUNE),
];

/// `text` with every run of whitespace made one space.
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// True if `text` has `word` with no name character right before or after it.
fn mentions(text: &str, word: &str) -> bool {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_name) && !after.is_some_and(is_name)
    })
}

/// The `WALSYNC_*` names in `text`.
fn variables(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("WALSYNC_"))
        .map(str::to_string)
        .collect()
}

fn rows(command: Commands) -> impl Iterator<Item = &'static Setting> {
    SETTINGS
        .iter()
        .copied()
        .filter(move |s| s.commands & command != 0)
}

/// argh's `--help` output for `args`, before rendering.
fn argh_help(args: &[&str]) -> String {
    match crate::args::Cli::from_args(&["walsync"], args) {
        Err(exit) if exit.status.is_ok() => exit.output,
        _ => panic!("{args:?} gave no help"),
    }
}

#[test]
fn ids_are_unique_and_every_row_says_something() {
    let ids: BTreeSet<&str> = SETTINGS.iter().map(|s| s.id).collect();
    assert_eq!(ids.len(), SETTINGS.len());
    for s in SETTINGS {
        assert!(s.commands != 0 && !s.help.is_empty(), "{s:?}");
        assert!(
            !s.help.ends_with('.'),
            "{}: argh's style has no period",
            s.id
        );
        if let Some(var) = s.var {
            assert!(var.starts_with("WALSYNC_"), "{var}");
        }
        // One flag, one meaning per command.
        for other in SETTINGS {
            if other.id != s.id && !s.flag.is_empty() && other.flag == s.flag {
                assert_eq!(other.commands & s.commands, 0, "{} and {}", s.id, other.id);
            }
        }
    }
}

#[test]
fn the_defaults_are_the_ones_the_code_uses() {
    let seconds = |s: &Setting| Duration::from_secs_f64(s.default.unwrap().parse().unwrap());
    let number = |s: &Setting| s.default.unwrap().parse::<u64>().unwrap();
    let options = walsync::Options::default();
    assert_eq!(seconds(&S3_TIMEOUT), walsync::storage::s3::DEFAULT_TIMEOUT);
    assert_eq!(seconds(&MIN_INTERVAL), options.min_interval);
    assert_eq!(seconds(&SNAPSHOT_INTERVAL), options.snapshot_interval);
    assert_eq!(number(&UPLOAD_WORKERS), options.upload_workers as u64);
    assert_eq!(number(&STAGING_LIMIT) * 1024 * 1024, options.staging_limit);
    assert_eq!(
        walsync::unstable::parse_duration(RETENTION.default.unwrap()).unwrap(),
        options.retention
    );
    assert_eq!(seconds(&SHUTDOWN_TIMEOUT), crate::watch::SHUTDOWN_TIMEOUT);
    assert_eq!(
        seconds(&HEARTBEAT_INTERVAL),
        crate::watch::HEARTBEAT_INTERVAL
    );
    assert_eq!(
        HEARTBEAT_MAX_LAG.default.unwrap(),
        format!(
            "{} --min-intervals, at least {}",
            crate::heartbeat::MAX_LAG_INTERVALS,
            crate::heartbeat::MIN_MAX_LAG.as_secs()
        )
    );
    assert_eq!(
        crate::commands::parse_mode(MODE.default.unwrap()).unwrap(),
        walsync::unstable::DEFAULT_MODE
    );
    let restore = ["restore", "app", "-o", "out.db"];
    let Some(crate::args::Command::Restore(cmd)) =
        crate::args::Cli::from_args(&["walsync"], &restore)
            .unwrap()
            .command
    else {
        panic!("not a restore");
    };
    assert_eq!(cmd.parallel as u64, number(&PARALLEL));
    assert_eq!(
        walsync::unstable::default_name(std::path::Path::new("/srv/app.db")).unwrap(),
        "app",
        "{:?}",
        NAME.default
    );
    let dir = std::path::Path::new("/srv");
    assert_eq!(
        format!("{:?}", walsync::DirectorySpec::new(dir)),
        format!(
            "{:?}",
            walsync::DirectorySpec::new(dir)
                .pattern(PATTERN.default.unwrap())
                .unwrap()
        )
    );
}

#[test]
fn switch_variables_read_as_one_rule() {
    assert_eq!(RECURSIVE.kind, Kind::Switch(true));
    assert_eq!(NO_LOG_TIMESTAMPS.kind, Kind::Switch(false));
    // Given, a switch is on whatever the variable says (it is not read).
    assert!(RECURSIVE.switch(true).unwrap());
}

/// Every flag argh parses has a row (its description is the row's), and every row of a
/// command is a flag of it.
#[test]
fn every_flag_is_in_the_table_and_back() {
    let mut commands = vec![("walsync", GLOBAL, argh_help(&["--help"]))];
    for (name, bit) in COMMANDS {
        commands.push((name, bit, argh_help(&[name, "--help"])));
    }
    for (name, bit, raw) in commands {
        let mut ids = BTreeSet::new();
        let lines: Vec<&str> = raw.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some((before, id)) = line.rsplit_once(PLACEHOLDER) else {
                continue;
            };
            let row = SETTINGS
                .iter()
                .find(|s| s.id == id)
                .unwrap_or_else(|| panic!("{name}: no row {id}"));
            assert!(row.commands & bit != 0, "{name} has {id}, its row does not");
            // The flag is on this line, or on the one before when it is long.
            let flag_line = if before.trim().is_empty() {
                lines[i - 1]
            } else {
                before
            };
            let flags: Vec<&str> = flag_line
                .split_whitespace()
                .map(|t| t.trim_end_matches(','))
                .collect();
            if row.flag.starts_with('-') {
                assert!(
                    flags.contains(&row.flag),
                    "{name}: {flag_line:?} is not {row:?}"
                );
                let short = row.short.map(|c| format!("-{c}"));
                assert_eq!(
                    flags.iter().any(|f| !f.starts_with("--")),
                    short.is_some(),
                    "{name}: {flag_line:?} and {row:?}"
                );
                if let Some(short) = short {
                    assert!(flags.contains(&short.as_str()), "{flag_line:?}");
                }
            } else {
                assert!(flags.iter().all(|f| !f.starts_with('-')), "{flag_line:?}");
            }
            ids.insert(id);
        }
        let want: BTreeSet<&str> = rows(bit)
            .filter(|s| !s.flag.is_empty())
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, want, "{name}");
        // Rendered, each description is there in full and no placeholder is left.
        let shown = render_help(&raw);
        assert!(!shown.contains(PLACEHOLDER), "{shown}");
        for line in shown.lines().filter(|l| l.len() > WIDTH) {
            assert!(raw.lines().any(|l| l == line), "too long: {line:?}");
        }
        for row in rows(bit).filter(|s| !s.flag.is_empty()) {
            assert!(
                words(&shown).contains(&row.description()),
                "{name}: {}",
                row.description()
            );
        }
    }
}

/// The entries of a section of a manual page: each header (4 spaces in) with the text
/// under it (deeper), whitespace made single spaces.
fn entries<'a>(page: &'a str, section: &str) -> Vec<(&'a str, String)> {
    let mut lines = page
        .lines()
        .skip_while(|l| *l != section)
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with(' '));
    let mut out: Vec<(&str, String)> = Vec::new();
    for line in lines.by_ref() {
        if line.starts_with("        ") {
            if let Some((_, text)) = out.last_mut() {
                text.push(' ');
                text.push_str(line.trim());
            }
        } else if !line.trim().is_empty() {
            out.push((line.trim(), String::new()));
        }
    }
    out
}

/// Which default `text` names: what follows "(default" up to the closing
/// parenthesis or semicolon, or None.
fn named_default(text: &str) -> Option<String> {
    let words = words(text);
    let (_, rest) = words.split_once("(default")?;
    let rest = rest.trim_start_matches(':').trim();
    Some(rest.split([')', ';']).next().unwrap().trim().to_string())
}

/// A header's flags: its words starting with `-`.
fn header_flags(header: &str) -> Vec<&str> {
    header
        .split_whitespace()
        .map(|w| w.trim_end_matches(','))
        .filter(|w| w.starts_with('-'))
        .collect()
}

#[test]
fn the_manual_pages_agree_with_the_table() {
    let all_vars: BTreeSet<&str> = SETTINGS.iter().filter_map(|s| s.var).collect();
    for (name, bit) in COMMANDS {
        let page = crate::help::page(name).unwrap();
        let options = entries(page, "OPTIONS");
        let environment = entries(page, "ENVIRONMENT");
        assert!(!options.is_empty() && !environment.is_empty(), "{name}");
        let env_text: String = environment
            .iter()
            .map(|(h, t)| format!("{h} {t} "))
            .collect();
        for row in rows(bit) {
            // The entry that documents it: its flag's under OPTIONS, else its
            // variable's under ENVIRONMENT; positional arguments may have none.
            let entry = if row.flag.is_empty() {
                let var = row.var.unwrap();
                environment.iter().find(|(h, _)| mentions(h, var))
            } else if row.flag.starts_with('-') {
                options
                    .iter()
                    .find(|(h, _)| header_flags(h).contains(&row.flag))
            } else {
                options.iter().find(|(h, _)| *h == row.flag)
            };
            let Some((header, text)) = entry else {
                assert!(
                    !row.flag.starts_with('-') && !row.flag.is_empty(),
                    "walsync help {name} does not document {}",
                    row.flag_name()
                );
                continue;
            };
            if let Some(short) = row.short {
                assert!(header.starts_with(&format!("-{short}, ")), "{header}");
            }
            assert_eq!(
                named_default(text).map(|d| d.starts_with(row.default.unwrap_or("\0"))),
                row.default.map(|_| true),
                "walsync help {name}, {header}: the default is {:?}, the table's {:?}",
                named_default(text),
                row.default
            );
            if let Some(var) = row.var {
                assert!(mentions(&env_text, var), "walsync help {name}: no {var}");
            }
        }
        // And nothing the table does not have.
        for (header, _) in &options {
            for flag in header_flags(header) {
                assert!(
                    rows(bit)
                        .any(|s| s.flag == flag
                            || s.short.is_some_and(|c| flag == format!("-{c}"))),
                    "walsync help {name} documents {flag}, which {name} does not have"
                );
            }
        }
        for var in variables(&env_text) {
            assert!(
                rows(bit).any(|s| s.var == Some(var.as_str())),
                "walsync help {name} lists {var}, which {name} does not read"
            );
        }
        for var in variables(page) {
            assert!(
                all_vars.contains(var.as_str()),
                "walsync help {name}: {var}?"
            );
        }
    }
}

/// The rows of README's table of settings (`| variable | flag | default | commands |`).
fn readme_table(readme: &str) -> Vec<Vec<String>> {
    let mut lines = readme
        .lines()
        .skip_while(|l| !l.starts_with("| variable | flag | default | commands |"))
        .skip(2);
    let mut rows = Vec::new();
    for line in lines.by_ref().take_while(|l| l.starts_with('|')) {
        let cells: Vec<String> = line
            .trim_matches('|')
            .split(" | ")
            .map(|c| c.trim().to_string())
            .collect();
        assert_eq!(cells.len(), 4, "{line}");
        rows.push(cells);
    }
    rows
}

#[test]
fn the_readme_table_agrees_with_the_table() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let table = readme_table(&readme);
    assert!(!table.is_empty(), "README has no table of settings");
    let mut seen = BTreeSet::new();
    for cells in &table {
        let var = cells[0].trim_matches('`');
        assert!(seen.insert(var.to_string()), "README lists {var} twice");
        let rows: Vec<&Setting> = SETTINGS
            .iter()
            .copied()
            .filter(|s| s.var == Some(var))
            .collect();
        assert!(
            !rows.is_empty(),
            "README lists {var}, which walsync does not read"
        );
        // Its flag, by name (or as "(none" if it has none).
        for row in &rows {
            let named = if row.flag.is_empty() {
                cells[1].starts_with("(none")
            } else {
                mentions(&cells[1], row.flag)
                    || row
                        .short
                        .is_some_and(|c| mentions(&cells[1], &format!("-{c}")))
            };
            assert!(named, "README: {var} is {:?}, not {:?}", row.flag, cells[1]);
        }
        // Its default, exactly.
        let defaults: Vec<&str> = rows.iter().filter_map(|s| s.default).collect();
        let cell = cells[2].replace('`', "");
        let cell = cell.split(" (").next().unwrap();
        assert_eq!(cell, defaults.join("; "), "README: the default of {var}");
        // Its commands.
        let bits = rows.iter().fold(0, |bits, s| bits | s.commands) & STORAGE;
        let expected = if bits == STORAGE {
            "all".to_string()
        } else {
            COMMANDS
                .iter()
                .filter(|(_, bit)| bits & bit != 0)
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(", ")
        };
        assert_eq!(cells[3], expected, "README: the commands of {var}");
    }
    let vars: BTreeSet<String> = SETTINGS
        .iter()
        .filter_map(|s| s.var)
        .map(str::to_string)
        .collect();
    assert_eq!(seen, vars, "README's table of settings");
    // Elsewhere README may name only these, and the service scripts' own variables.
    let mut contrib = String::new();
    let mut dirs = vec![root.join("contrib")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(text) = std::fs::read_to_string(&path) {
                contrib.push_str(&text);
            }
        }
    }
    for var in variables(&readme) {
        assert!(
            vars.contains(&var) || mentions(&contrib, &var),
            "README names {var}, which neither walsync nor contrib/ reads"
        );
    }
}
