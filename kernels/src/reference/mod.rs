//! CPU references of every kernel: the same semantics, written for clarity
//! (sums in f64, so they are the accurate side of a comparison). Argument
//! structs are shared with the launch code in [`crate::device`].

mod cache_lookup;
pub(crate) mod compact;
mod epilogue;
mod layout;

pub use cache_lookup::{cache_lookup, CacheHead, Lookup};
pub use compact::{compact_index, gather_rows};
pub use epilogue::{block_epilogue, EpilogueParams, EpilogueShape};
pub use layout::{nhwc_to_nchw, pad2d, row_bias_act};

use crate::KernelError;

/// The activation an epilogue applies (the kernels' `act` argument).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(i32)]
pub enum Activation {
    #[default]
    None = 0,
    Relu = 1,
    /// `min(max(x, 0), 6)` (EfficientNet-Lite, MobileNet).
    Relu6 = 2,
}

impl Activation {
    /// Applies it to one value.
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Activation::None => v,
            Activation::Relu => v.max(0.0),
            Activation::Relu6 => v.clamp(0.0, 6.0),
        }
    }
}

/// Fails unless `len` is `want` (what: the argument's name).
pub(crate) fn check_len(what: &str, len: usize, want: usize) -> Result<(), KernelError> {
    if len == want {
        Ok(())
    } else {
        Err(KernelError::Shape(format!("{what} has {len} values, the shape needs {want}")))
    }
}
