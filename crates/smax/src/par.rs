//! Work splitting. Everything here depends on shapes only, never on the thread count, so the
//! arithmetic each row sees (and so its bits) is the same for every pool size and every batch.

use crate::options::Par;
use rayon::prelude::*;

/// Rows longer than this are split into chunks of exactly this many elements (the last one
/// shorter) whose partial states merge in chunk order. A multiple of the reduction block.
pub(crate) const CHUNK: usize = 64 * 1024;

/// Target elements per task when batching short rows.
pub(crate) const GRAIN: usize = 16 * 1024;

/// Rows per task for rows of `len` elements.
pub(crate) fn rows_per_task(len: usize) -> usize {
    (GRAIN / len.max(1)).max(1)
}

/// Runs `f(i, item)` for every item, in parallel under `Par::Rayon`.
pub(crate) fn for_each<I, F>(par: Par, items: Vec<I>, f: F)
where
    I: Send,
    F: Fn(usize, I) + Sync + Send,
{
    match par {
        Par::Seq => items.into_iter().enumerate().for_each(|(i, it)| f(i, it)),
        Par::Rayon => items.into_par_iter().enumerate().for_each(|(i, it)| f(i, it)),
    }
}

/// Maps every item to a value, keeping order, in parallel under `Par::Rayon`.
pub(crate) fn map<I, R, F>(par: Par, items: Vec<I>, f: F) -> Vec<R>
where
    I: Send,
    R: Send,
    F: Fn(I) -> R + Sync + Send,
{
    match par {
        Par::Seq => items.into_iter().map(f).collect(),
        Par::Rayon => items.into_par_iter().map(f).collect(),
    }
}
