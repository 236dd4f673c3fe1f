//! Queue names in the console's text: shown so that every name is unambiguous on a terminal,
//! and read back in that same form.
//!
//! A name is shown as it is unless it has a character that is invisible or changes how text
//! around it is laid out (Unicode general categories Cc, Cf, Zl, Zp, and whitespace other than
//! a plain space), leading or trailing whitespace, or a leading `"`. Such a name is shown
//! quoted: `"jobs "`, `"a\u{202e}b"`, with `\"` and `\\` for a quote and a backslash. The
//! console takes a name argument in either form. JSON output is not concerned: its escaping
//! already keeps the exact name unambiguous.

use std::borrow::Cow;
use std::fmt::{self, Write};

/// Format characters (general category Cf, Unicode 15.1), as inclusive ranges.
const FORMAT_CHARS: &[(char, char)] = &[
    ('\u{ad}', '\u{ad}'),
    ('\u{600}', '\u{605}'),
    ('\u{61c}', '\u{61c}'),
    ('\u{6dd}', '\u{6dd}'),
    ('\u{70f}', '\u{70f}'),
    ('\u{890}', '\u{891}'),
    ('\u{8e2}', '\u{8e2}'),
    ('\u{180e}', '\u{180e}'),
    ('\u{200b}', '\u{200f}'),
    ('\u{202a}', '\u{202e}'),
    ('\u{2060}', '\u{2064}'),
    ('\u{2066}', '\u{206f}'),
    ('\u{feff}', '\u{feff}'),
    ('\u{fff9}', '\u{fffb}'),
    ('\u{110bd}', '\u{110bd}'),
    ('\u{110cd}', '\u{110cd}'),
    ('\u{13430}', '\u{1343f}'),
    ('\u{1bca0}', '\u{1bca3}'),
    ('\u{1d173}', '\u{1d17a}'),
    ('\u{e0001}', '\u{e0001}'),
    ('\u{e0020}', '\u{e007f}'),
];

/// Whether `c` is shown as an escape: a control (Cc), format (Cf), line or paragraph
/// separator (Zl, Zp) character, or whitespace that is not a plain space.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}')
        || (c.is_whitespace() && c != ' ')
        || FORMAT_CHARS.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

/// Whether `name` must be shown quoted.
fn needs_quotes(name: &str) -> bool {
    name.is_empty()
        || name.starts_with('"')
        || name.starts_with(char::is_whitespace)
        || name.ends_with(char::is_whitespace)
        || name.chars().any(needs_escape)
}

/// How the console shows `name`: as it is when that is unambiguous, else quoted with escapes.
pub fn display(name: &str) -> Cow<'_, str> {
    if !needs_quotes(name) {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 8);
    out.push('"');
    for c in name.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    Cow::Owned(out)
}

/// Why a quoted name argument could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameSyntax {
    /// No closing `"`.
    Unterminated,
    /// A `\` followed by something other than `"`, `\` or `u{HEX}` naming a character.
    BadEscape(String),
    /// Text after the closing `"`.
    Trailing(String),
}

impl fmt::Display for NameSyntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameSyntax::Unterminated => f.write_str("a quoted name without its closing \""),
            NameSyntax::BadEscape(e) => write!(
                f,
                "unknown escape {e:?} in a quoted name (use \\\", \\\\ or \\u{{HEX}})"
            ),
            NameSyntax::Trailing(t) => write!(f, "text after a quoted name: {t:?}"),
        }
    }
}

/// Reads a name argument, already trimmed: quoted (as [`display`] shows it) if it starts with
/// `"`, else taken as it is.
pub fn parse(arg: &str) -> Result<Cow<'_, str>, NameSyntax> {
    let Some(quoted) = arg.strip_prefix('"') else {
        return Ok(Cow::Borrowed(arg));
    };
    let mut out = String::with_capacity(quoted.len());
    let mut chars = quoted.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => {
                let rest = &quoted[at + 1..];
                if !rest.trim().is_empty() {
                    return Err(NameSyntax::Trailing(rest.trim().to_string()));
                }
                return Ok(Cow::Owned(out));
            }
            '\\' => match chars.next() {
                Some((_, '"')) => out.push('"'),
                Some((_, '\\')) => out.push('\\'),
                Some((u, 'u')) => {
                    let rest = &quoted[u + 1..];
                    let bad = || NameSyntax::BadEscape(format!("\\u{}", preview(rest)));
                    let hex = rest
                        .strip_prefix('{')
                        .and_then(|r| r.split_once('}'))
                        .map(|(hex, _)| hex)
                        .filter(|hex| (1..=6).contains(&hex.len()))
                        .ok_or_else(bad)?;
                    let c = u32::from_str_radix(hex, 16)
                        .ok()
                        .and_then(char::from_u32)
                        .ok_or_else(bad)?;
                    out.push(c);
                    // Skip `{HEX}`.
                    for _ in 0..hex.len() + 2 {
                        chars.next();
                    }
                }
                Some((_, other)) => return Err(NameSyntax::BadEscape(format!("\\{other}"))),
                None => return Err(NameSyntax::Unterminated),
            },
            c => out.push(c),
        }
    }
    Err(NameSyntax::Unterminated)
}

/// The start of `text`, for an error message.
fn preview(text: &str) -> &str {
    match text.char_indices().nth(8) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_stay_plain() {
        for name in ["jobs", "zürich", "a b", "x\"y", "back\\slash", "日本"] {
            assert_eq!(display(name), name);
            assert_eq!(parse(name).unwrap(), name);
        }
    }

    #[test]
    fn ambiguous_names_are_quoted_and_read_back() {
        let cases = [
            ("jobs ", "\"jobs \""),
            (" jobs", "\" jobs\""),
            ("a\u{202e}b", "\"a\\u{202e}b\""),
            ("zero\u{200b}width", "\"zero\\u{200b}width\""),
            ("\u{feff}bom", "\"\\u{feff}bom\""),
            ("line\u{2028}sep", "\"line\\u{2028}sep\""),
            ("nb\u{a0}sp", "\"nb\\u{a0}sp\""),
            ("\"quoted\"", "\"\\\"quoted\\\"\""),
            ("back\\ ", "\"back\\\\ \""),
            ("tag\u{e0041}", "\"tag\\u{e0041}\""),
        ];
        for (name, shown) in cases {
            assert_eq!(display(name), shown, "{name:?}");
            assert_eq!(parse(shown).unwrap(), name, "{shown}");
        }
    }

    #[test]
    fn bad_quoted_forms_are_errors() {
        assert_eq!(parse("\"open"), Err(NameSyntax::Unterminated));
        assert_eq!(parse("\"a\\"), Err(NameSyntax::Unterminated));
        assert!(matches!(parse("\"a\\n\""), Err(NameSyntax::BadEscape(_))));
        assert!(matches!(
            parse("\"\\u{110000}\""),
            Err(NameSyntax::BadEscape(_))
        ));
        assert!(matches!(parse("\"\\u{}\""), Err(NameSyntax::BadEscape(_))));
        assert!(matches!(
            parse("\"\\u202e\""),
            Err(NameSyntax::BadEscape(_))
        ));
        assert_eq!(parse("\"a\" b"), Err(NameSyntax::Trailing("b".to_string())));
        assert_eq!(parse("\"a\"  ").unwrap(), "a");
    }
}
