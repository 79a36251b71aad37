//! Decoding fuzz bytes into sizes, parameters and values. Reading past the end yields zeros, so
//! every byte string decodes to some input.

/// The largest buffer the harness allocates from a decoded size.
pub const LEN_CAP: usize = 4096;

/// A cursor over the fuzz bytes.
pub struct Input<'a> {
    data: &'a [u8],
}

/// Values that break naive code: signed zeros, the extremes, subnormals, the edges of `exp`.
const F64_SPECIAL: [f64; 20] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    f32::MAX as f64,
    -(f32::MAX as f64),
    f32::MIN_POSITIVE as f64,
    1e-45,
    1e-39,
    1e-310,
    1e30,
    -1e30,
    88.7,
    -87.4,
    1e300,
    0.5,
    2.0,
];

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }

    /// A size: mostly `0..=max`, sometimes one that no buffer can back.
    pub fn size(&mut self, max: usize) -> usize {
        match self.u8() {
            0..=239 => self.u8() as usize % (max + 1),
            240..=247 => usize::MAX,
            248..=251 => 1 << 40,
            252..=253 => usize::MAX / 2 + 1,
            _ => (self.u32() as usize) % 100_000,
        }
    }

    /// A small count `0..=max` (no huge values).
    pub fn small(&mut self, max: usize) -> usize {
        self.u8() as usize % max.saturating_add(1)
    }

    /// A value: a special one, a small integer, or raw f64 bits.
    pub fn f64(&mut self) -> f64 {
        match self.u8() {
            0..=99 => F64_SPECIAL[self.u8() as usize % F64_SPECIAL.len()],
            100..=219 => (self.u8() as i8) as f64 / 8.0,
            220..=239 => f32::from_bits(self.u32()) as f64,
            _ => f64::from_bits(self.u64()),
        }
    }

    /// A parameter: mostly ordinary values, sometimes a special one.
    pub fn param(&mut self, ordinary: &[f64]) -> f64 {
        let b = self.u8();
        if (b as usize) < 200 && !ordinary.is_empty() {
            ordinary[b as usize % ordinary.len()]
        } else {
            F64_SPECIAL[b as usize % F64_SPECIAL.len()]
        }
    }

    pub fn values(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.f64()).collect()
    }

    /// Values for a buffer whose length is [`Input::len_near`] `want`.
    pub fn values_near(&mut self, want: usize) -> Vec<f64> {
        let n = self.len_near(want);
        self.values(n)
    }

    /// [`Input::values_near`] rounded to f32.
    pub fn f32s_near(&mut self, want: usize) -> Vec<f32> {
        self.values_near(want).iter().map(|&v| v as f32).collect()
    }

    /// A buffer length near `want` (exact most of the time, sometimes short or long), at most
    /// one past [`LEN_CAP`]: a size beyond it is meant for the validation, not to be backed.
    pub fn len_near(&mut self, want: usize) -> usize {
        let want = want.min(LEN_CAP);
        match self.u8() {
            0..=223 => want,
            224..=239 => want.saturating_sub(1),
            240..=247 => want + 1,
            _ => 0,
        }
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.u8() as usize % items.len()]
    }
}
