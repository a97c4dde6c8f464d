//! Placeholder; filled in by the core implementation.
