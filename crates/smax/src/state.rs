//! The mergeable log-sum-exp state (Milakov & Gimelshein 2018; `ALGORITHMS.md` N3).

/// A partial log-sum-exp over some set of values: `sum · e^max = Σ exp(x_i)`.
///
/// The state is a commutative monoid under [`LseState::merge`] whose identity is
/// [`LseState::EMPTY`] `= (max: -inf, sum: 0)`: merging with the empty state returns the other
/// state bit for bit, and empty ⊕ empty = empty (never NaN; `NEEDS.md` guarantee 5). Merges
/// combine through `max` and `exp(max_i − max)`, never through `exp(lse)`, so no partial
/// overflows. NaN in either operand gives a NaN sum; a `+inf` max gives `lse = +inf`.
///
/// Error: each merge adds at most 2 rounding errors of `F` to `sum` (one `exp`, one fused
/// multiply-add) relative to the exact value; `lse()` adds one `ln` and one addition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LseState<F = f32> {
    /// The running maximum (`-inf` when empty).
    pub max: F,
    /// `Σ exp(x_i − max)`, in `[1, n]` for `n` finite values.
    pub sum: F,
}

macro_rules! lse_state {
    ($f:ty) => {
        impl LseState<$f> {
            /// The state of the empty set, `(-inf, 0)`; `lse() = -inf`.
            pub const EMPTY: Self = LseState { max: <$f>::NEG_INFINITY, sum: 0.0 };

            /// The state of one value (`x = -inf` gives [`Self::EMPTY`]).
            pub fn from_value(x: $f) -> Self {
                if x == <$f>::NEG_INFINITY { Self::EMPTY } else { LseState { max: x, sum: 1.0 } }
            }

            /// The state of a slice, by sequential [`Self::push`].
            pub fn from_slice(xs: &[$f]) -> Self {
                let mut s = Self::EMPTY;
                for &x in xs {
                    s.push(x);
                }
                s
            }

            /// Adds one value (Milakov & Gimelshein's element update, guarded for `-inf`).
            pub fn push(&mut self, x: $f) {
                *self = self.merge(Self::from_value(x));
            }

            /// Combines two partial states. Identity: [`Self::EMPTY`].
            pub fn merge(self, other: Self) -> Self {
                let (a, b) = (self, other);
                if a.max.is_nan() || b.max.is_nan() || a.sum.is_nan() || b.sum.is_nan() {
                    return LseState { max: <$f>::NAN, sum: <$f>::NAN };
                }
                if b.max == <$f>::NEG_INFINITY {
                    return a;
                }
                if a.max == <$f>::NEG_INFINITY {
                    return b;
                }
                if a.max == b.max {
                    return LseState { max: a.max, sum: a.sum + b.sum };
                }
                if a.max > b.max {
                    LseState { max: a.max, sum: b.sum.mul_add((b.max - a.max).exp(), a.sum) }
                } else {
                    LseState { max: b.max, sum: a.sum.mul_add((a.max - b.max).exp(), b.sum) }
                }
            }

            /// `log Σ exp(x_i) = max + ln(sum)`: `-inf` when empty, `+inf` if a `+inf` was
            /// seen, NaN if a NaN was.
            pub fn lse(self) -> $f {
                if self.max == <$f>::NEG_INFINITY {
                    return <$f>::NEG_INFINITY;
                }
                if self.max == <$f>::INFINITY && !self.sum.is_nan() {
                    return <$f>::INFINITY;
                }
                self.max + self.sum.ln()
            }

            /// True for the empty state.
            pub fn is_empty(self) -> bool {
                self.max == <$f>::NEG_INFINITY && self.sum == 0.0
            }
        }

        impl Default for LseState<$f> {
            fn default() -> Self {
                Self::EMPTY
            }
        }
    };
}

lse_state!(f32);
lse_state!(f64);
