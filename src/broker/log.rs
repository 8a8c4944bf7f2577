//! Client-supplied text in the broker's log. A newline or an escape
//! sequence in a workflow name, an argv or a path would otherwise write a
//! line of the client's choosing into the log (or move the cursor of the
//! terminal that shows it). Under journald every field is its own
//! structured field either way; the escaping keeps each one on one line.

use std::fmt;

/// Displays `0` with control characters (and backslashes) escaped as in
/// Rust string literals; printable text, including non-ASCII, is kept.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            if c.is_control() || c == '\\' {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_stay_on_one_line() {
        let forged = "ls\n2025-01-01T00:00:00Z  INFO corral: root logged in\u{1b}[2J\\";
        let shown = Escaped(forged).to_string();
        assert!(!shown.contains('\n') && !shown.contains('\u{1b}'), "{shown}");
        assert_eq!(shown, "ls\\n2025-01-01T00:00:00Z  INFO corral: root logged in\\u{1b}[2J\\\\");
        assert_eq!(Escaped("grüße").to_string(), "grüße");
    }
}
