//! File-name globs for `watch --pattern`: `*`, `?` and `[...]`, as shells match names.
//!
//! Written here rather than taken from a crate: the few lines below are all walsync needs
//! (names, not paths: no `**`, no braces), where the glob crates bring path walking and
//! options it would never use.

use crate::error::{Error, Result};

/// A glob over file names: `*` (any run of characters), `?` (any one character), `[...]`
/// (one of the characters or ranges listed; `[!...]` or `[^...]`: none of them), anything
/// else literally. Small on purpose: file names only, no `**`, no braces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern(String);

impl Default for Pattern {
    fn default() -> Pattern {
        Pattern("*.db".into())
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Pattern {
    /// A pattern for file names: not empty, no `/`.
    pub fn new(glob: &str) -> Result<Pattern> {
        if glob.is_empty() || glob.contains('/') {
            return Err(Error::invalid(format!(
                "--pattern {glob:?}: expected a glob over file names, such as *.db or \
                 *.sqlite (no '/')"
            )));
        }
        Ok(Pattern(glob.to_string()))
    }

    pub fn matches(&self, name: &str) -> bool {
        let pattern: Vec<char> = self.0.chars().collect();
        let name: Vec<char> = name.chars().collect();
        glob(&pattern, &name)
    }
}

/// Whether `name` matches `pattern`: left to right, going back to the last `*` to let it
/// take one more character when the rest fails (linear in practice, never exponential).
fn glob(pattern: &[char], name: &[char]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        let step = match pattern.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
                continue;
            }
            Some('?') => Some(p + 1),
            Some('[') => match class(pattern, p, name[n]) {
                Some((true, next)) => Some(next),
                Some((false, _)) => None,
                None => (name[n] == '[').then_some(p + 1),
            },
            Some(c) => (*c == name[n]).then_some(p + 1),
            None => None,
        };
        match (step, star) {
            (Some(next), _) => {
                p = next;
                n += 1;
            }
            (None, Some((star_p, star_n))) => {
                p = star_p + 1;
                n = star_n + 1;
                star = Some((star_p, star_n + 1));
            }
            (None, None) => return false,
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

/// The class opening at `pattern[open]` (a `[`): whether `c` is in it, and where the
/// pattern goes on after it. None when it never closes (the `[` is then literal).
fn class(pattern: &[char], open: usize, c: char) -> Option<(bool, usize)> {
    let mut i = open + 1;
    let negated = matches!(pattern.get(i), Some('!' | '^'));
    if negated {
        i += 1;
    }
    let mut found = false;
    let mut first = true;
    loop {
        let item = *pattern.get(i)?;
        if item == ']' && !first {
            return Some((found != negated, i + 1));
        }
        first = false;
        match (pattern.get(i + 1), pattern.get(i + 2)) {
            (Some('-'), Some(&end)) if end != ']' => {
                found |= item <= c && c <= end;
                i += 3;
            }
            _ => {
                found |= item == c;
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_file_names() {
        let cases = [
            ("*.db", "app.db", true),
            ("*.db", "app.db-wal", false),
            ("*.db", "app.sqlite", false),
            ("*.db", ".db", true),
            ("*", "anything", true),
            ("a?c.db", "abc.db", true),
            ("a?c.db", "ac.db", false),
            ("*.sqlite*", "x.sqlite3", true),
            ("[ab]*.db", "b1.db", true),
            ("[ab]*.db", "c1.db", false),
            ("[!ab]*.db", "c1.db", true),
            ("[^ab]*.db", "a1.db", false),
            ("db[0-9].db", "db7.db", true),
            ("db[0-9].db", "dbx.db", false),
            ("[]x].db", "].db", true),
            ("[a-].db", "-.db", true),
            ("[unclosed.db", "[unclosed.db", true),
            ("*a*b*c", "aXbXc", true),
            ("*a*b*c", "aXcXb", false),
            ("*.db", "a.db.db", true),
        ];
        for (pattern, name, expected) in cases {
            let p = Pattern::new(pattern).unwrap();
            assert_eq!(p.matches(name), expected, "{pattern} against {name}");
        }
        assert!(Pattern::new("").is_err());
        assert!(Pattern::new("a/*.db").is_err());
    }
}
