//! A Service's selector: the labels that pick its pods, which exchange's
//! selector mode rewrites, and how ktb shows it to people.

use std::collections::BTreeMap;

/// Label key to value, ordered so that two equal selectors print alike.
pub type Selector = BTreeMap<String, String>;

/// Renders a selector as `k=v,k=v`, as kubectl shows it.
pub fn display(selector: &Selector) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
