//! Incident response from the appliance: each step of the reference runbook as one command
//! that cannot be half-done, is safe to repeat, and says what it did and what is left for a
//! person. `sever` needs nothing but this host (no API, no network).

pub mod archive;
pub mod audit;
pub mod rotate;
pub mod sever;
pub mod teardown;
