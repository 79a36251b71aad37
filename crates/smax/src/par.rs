//! Work splitting. Everything here depends on shapes only, never on the thread count, so the
//! arithmetic each row sees (and so its bits) is the same for every pool size and every batch.

use rayon::prelude::*;

/// How a call may use threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Par {
    /// The calling thread only.
    Seq,
    /// The current rayon pool (the global one, or the one a caller entered with
    /// `ThreadPool::install`). Work is split by a fixed grain, so results are bitwise identical
    /// for every pool size.
    #[default]
    Rayon,
}

/// Rows longer than this are split into chunks of exactly this many elements (the last one
/// shorter) whose partial states merge in chunk order. A multiple of the reduction block;
/// 1 MiB of f32, so a row up to one chunk stays in one core's L2 across its passes.
pub(crate) const CHUNK: usize = 256 * 1024;

/// Target elements per task when batching short rows.
pub(crate) const GRAIN: usize = 16 * 1024;

/// Rows per task for rows of `len` elements.
pub(crate) fn rows_per_task(len: usize) -> usize {
    (GRAIN / len.max(1)).max(1)
}

/// Splits the output of `rows` rows (row `r` at `r * stride`, `len` elements) into disjoint
/// groups of [`rows_per_task`] rows: `(first row, row count, the group's slice)`.
pub(crate) fn row_groups<T>(y: &mut [T], rows: usize, len: usize, stride: usize) -> Vec<(usize, usize, &mut [T])> {
    row_groups_per(y, rows, len, stride, rows_per_task(len))
}

/// Target elements per task of a software-pipelined forward call (each task pays one
/// unpipelined first row).
pub(crate) const PIPE_GRAIN: usize = 1024 * 1024;

/// Rows per task of a software-pipelined forward call: about [`PIPE_GRAIN`] elements, and at
/// least 16 tasks when there are rows enough (for load balance).
pub(crate) fn pipe_rows_per_task(rows: usize, len: usize) -> usize {
    let by_size = (PIPE_GRAIN / len.max(1)).max(1);
    by_size.min(rows / 16).max(1)
}

/// [`row_groups`] with `per` rows per group.
pub(crate) fn row_groups_per<T>(
    y: &mut [T],
    rows: usize,
    len: usize,
    stride: usize,
    per: usize,
) -> Vec<(usize, usize, &mut [T])> {
    let per = per.max(1);
    let mut items = Vec::with_capacity(rows.div_ceil(per));
    let mut rest = y;
    let mut r0 = 0;
    while r0 < rows {
        let cnt = per.min(rows - r0);
        // The last group ends at its last row's end (the buffer may stop there).
        let cut = if r0 + cnt < rows { cnt * stride } else { (cnt - 1) * stride + len };
        let (head, tail) = rest.split_at_mut(cut);
        items.push((r0, cnt, head));
        rest = tail;
        r0 += cnt;
    }
    items
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
