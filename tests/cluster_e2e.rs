//! End-to-end checks of the project's test cluster (issue 3): being built.
