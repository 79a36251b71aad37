//! Validators shared by the families: one definition per rule, so every op reports the same
//! error for the same mistake.

use crate::error::{Error, Result};

/// Class targets: exactly `rows` of them, each in `[0, classes)` or equal to `ignore`.
/// Errors: [`Error::LengthMismatch`] (`what: "targets"`), then [`Error::TargetOutOfRange`] for
/// the first bad row.
pub(crate) fn targets(t: &[i64], rows: usize, classes: usize, ignore: Option<i64>) -> Result<()> {
    if t.len() != rows {
        return Err(Error::LengthMismatch { what: "targets", len: t.len(), expected: rows });
    }
    let in_range = |v: i64| usize::try_from(v).is_ok_and(|v| v < classes);
    match t.iter().enumerate().find(|(_, v)| Some(**v) != ignore && !in_range(**v)) {
        Some((row, &target)) => Err(Error::TargetOutOfRange { row, target, classes }),
        None => Ok(()),
    }
}
