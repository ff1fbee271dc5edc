//! Showing an error to a user: what happened, then each cause, every one once.
//!
//! An error either writes its cause into its own message or hands it out as
//! [`std::error::Error::source`], never both; [`Report`] walks the sources, so a cause
//! handed out is printed after its error, and one written in is printed by its error.

use std::error::Error;
use std::fmt;

/// An error and its causes, displayed as `what happened: cause: its cause`.
pub struct Report<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

/// `e` as [`Report`] prints it.
pub fn report(e: &(dyn Error + 'static)) -> String {
    Report(e).to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Checks that no message in `e`'s chain repeats the next one (a cause printed twice)
    /// and returns the report.
    pub(crate) fn report_once(e: &(dyn Error + 'static)) -> String {
        let mut level = e;
        while let Some(cause) = level.source() {
            let (outer, inner) = (level.to_string(), cause.to_string());
            assert!(!outer.contains(&inner), "{outer:?} prints its cause {inner:?}, which also follows it");
            level = cause;
        }
        report(e)
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the file")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_report_prints_each_cause_once_after_its_error() {
        let e = Outer(std::io::Error::from_raw_os_error(libc::ENOENT));
        let text = report_once(&e);
        assert_eq!(
            text,
            format!("cannot read the file: {}", std::io::Error::from_raw_os_error(libc::ENOENT))
        );
        assert_eq!(text.matches("No such file").count(), 1, "{text}");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the file: {0}")]
    struct Twice(#[source] std::io::Error);

    #[test]
    #[should_panic(expected = "prints its cause")]
    fn a_cause_both_written_in_and_handed_out_is_caught() {
        report_once(&Twice(std::io::Error::from_raw_os_error(libc::ENOENT)));
    }
}
