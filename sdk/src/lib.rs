//! gati sandbox SDK.
//!
//! Owns the one definition of the daemon ↔ function shared-memory layout
//! ([`layout`], [`ring`]) and the guest side of the protocol ([`serve`]).
//! A function is an ordinary program that calls [`serve`] with its handler:
//!
//! ```ignore
//! fn main() {
//!     gati_sdk::serve(|input: &[u8]| Ok(input.to_ascii_uppercase()))
//! }
//! ```
//!
//! # File descriptors a function inherits
//!
//! | fd | what |
//! |---|---|
//! | 3 | the memfd holding the [`layout::Layout`] region |
//! | 4 | request eventfd: the daemon writes 1 after pushing a request; the function blocks reading it |
//! | 5 | response eventfd: the function writes 1 once ready and after each response |
//!
//! The daemon also sets `GATI_SANDBOX_FDS=3,4,5`; [`serve`] reads the numbers
//! from it when present (so a test harness may pass others) and falls back to
//! 3, 4, 5. stdin is `/dev/null`; stdout and stderr are the daemon's.

pub mod guest;
pub mod layout;
pub mod ring;

pub use guest::{serve, try_serve, ServeError};

/// Environment variable naming the memfd, request and response eventfds.
pub const FDS_ENV: &str = "GATI_SANDBOX_FDS";
/// The descriptor numbers used when [`FDS_ENV`] is absent.
pub const DEFAULT_FDS: [i32; 3] = [3, 4, 5];
