//! The HolySheep API: the client the worker calls, how its answers are
//! classified, and the mock that stands in for it in demos, tests and benchmarks.

pub mod client;
pub mod error;
pub mod mock;
pub mod ratelimit;

pub use client::{Attempt, Client, Response};
pub use error::Verdict;
