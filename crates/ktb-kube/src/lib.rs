//! What ktb writes into a Kubernetes cluster, and how it is undone.
//!
//! The CLI changes a Service when a developer exchanges it; the agent must
//! be able to undo that change when the laptop vanishes, and `ktb recover`
//! from any machine. All three share this crate, so there is exactly one
//! definition of the names, labels and annotations ktb uses and one
//! restore procedure. The original selector is kept on the Service itself
//! (an annotation), where anyone with access to the Service can find it.

pub mod grace;
pub mod lease;
pub mod mesh;
pub mod names;
pub mod selector;
pub mod service;
pub mod workload;
