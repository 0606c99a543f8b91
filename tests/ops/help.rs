//! `walsync help COMMAND` against `walsync COMMAND --help`: every page has its sections
//! and names every flag and `WALSYNC_*` variable the summary lists, and both say the same
//! rule (prune's) and summary.

use crate::common::fixtures::walsync;

/// The flags `walsync COMMAND --help` lists (None if there is no such command yet).
fn flags_of(command: &str) -> Option<Vec<String>> {
    let out = walsync(&[command, "--help"], &[]);
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let options = text.split("Options:").nth(1)?;
    let options = options.split("\n\n").next()?;
    let mut flags = Vec::new();
    for line in options.lines() {
        let line = line.trim_start();
        if !line.starts_with('-') {
            continue; // a continued description
        }
        for token in line.split_whitespace() {
            let token = token.trim_end_matches(',');
            if !token.starts_with('-') {
                break;
            }
            if token != "--help" {
                flags.push(token.to_string());
            }
        }
    }
    Some(flags)
}

/// True if `text` has `word` with no name character right after or before it.
fn mentions(text: &str, word: &str) -> bool {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_name) && !after.is_some_and(is_name)
    })
}

#[test]
fn help_pages_document_every_flag_of_every_command() {
    let index = walsync(&["help"], &[]);
    assert!(index.status.success());
    let index = String::from_utf8_lossy(&index.stdout).into_owned();
    let mut checked = 0;
    for command in ["watch", "snapshot", "list", "status", "restore", "prune"] {
        assert!(
            mentions(&index, command),
            "walsync help does not list {command}"
        );
        let page = walsync(&["help", command], &[]);
        assert!(page.status.success(), "walsync help {command} failed");
        let page = String::from_utf8_lossy(&page.stdout).into_owned();
        for section in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "OPTIONS",
            "ENVIRONMENT",
            "EXIT STATUS",
            "EXAMPLES",
        ] {
            assert!(
                page.lines().any(|l| l == section),
                "walsync help {command} has no {section} section"
            );
        }
        let Some(flags) = flags_of(command) else {
            eprintln!("walsync {command} does not exist in this build yet: not checked");
            continue;
        };
        assert!(!flags.is_empty(), "no flags parsed for {command}");
        for flag in &flags {
            assert!(
                mentions(&page, flag),
                "walsync help {command} does not mention {flag}"
            );
        }
        // And every WALSYNC_* variable the flag summary names.
        let summary =
            String::from_utf8_lossy(&walsync(&[command, "--help"], &[]).stdout).into_owned();
        for word in summary.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("WALSYNC_") {
                assert!(mentions(&page, word), "walsync help {command}: no {word}");
            }
        }
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} commands checked");
    let unknown = walsync(&["help", "nosuch"], &[]);
    assert_eq!(unknown.status.code(), Some(2));
}

/// `text` with every run of whitespace made one space.
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn help_and_dash_dash_help_say_the_same_rule_and_summary() {
    // prune's rule: the note of `prune --help` is a paragraph of `help prune`.
    let short = walsync(&["prune", "--help"], &[]);
    assert!(short.status.success());
    let short = String::from_utf8_lossy(&short.stdout).into_owned();
    let page = walsync(&["help", "prune"], &[]);
    let page = words(&String::from_utf8_lossy(&page.stdout));
    let notes = short
        .split("Notes:")
        .nth(1)
        .unwrap_or_else(|| panic!("no notes in {short}"));
    let rule = words(notes.split("Exit codes:").next().unwrap());
    assert!(rule.len() > 200, "{rule}");
    assert!(
        page.contains(&rule),
        "prune --help says {rule:?}; help prune: {page}"
    );
    assert!(rule.contains("newest snapshot"), "{rule}");
    // Every command's one-line summary in `walsync help` is the one its page gives.
    let index = String::from_utf8_lossy(&walsync(&["help"], &[]).stdout).into_owned();
    for command in ["watch", "snapshot", "list", "status", "restore", "prune"] {
        let summary = index
            .lines()
            .find_map(|l| l.trim().strip_prefix(command))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{command} not in {index}"));
        let page = String::from_utf8_lossy(&walsync(&["help", command], &[]).stdout).into_owned();
        let name = format!("walsync {command} - {summary}");
        assert!(
            page.lines().any(|l| l.trim() == name),
            "walsync help says {summary:?}, its page: {page}"
        );
    }
}
