//! The Roles of `deploy/rbac/` as tests apply them: in a namespace of the
//! test's own, bound to one developer (a User rather than the `developers`
//! Group, so the other developer keeps whatever they had), as shipped or
//! with one rule cut down, to see what ktb says about a missing verb.

use crate::cluster::As;

/// The subject every file in `deploy/rbac/` binds its Role to.
const GROUP_SUBJECT: &str = "  - kind: Group\n    name: developers\n";

/// `deploy/rbac/FILE` for `namespace`, bound to `who` alone.
pub fn role_file(file: &str, namespace: &str, who: As) -> String {
    let path = format!("{}/../deploy/rbac/{file}", env!("CARGO_MANIFEST_DIR"));
    let yaml = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(
        yaml.contains(GROUP_SUBJECT),
        "{path}: no developers Group subject"
    );
    yaml.replace("NAMESPACE", namespace).replace(
        GROUP_SUBJECT,
        &format!("  - kind: User\n    name: {}\n", who.user()),
    )
}

/// `deploy/rbac/developer.yaml` for `namespace`, bound to `who` alone, with
/// its rule on `resource` (e.g. `pods/portforward`, a rule of that resource
/// alone) cut down to `keep_verbs`, or dropped if none remain. Returns the
/// manifest and the verbs removed.
pub fn developer_role_without(
    namespace: &str,
    who: As,
    resource: &str,
    keep_verbs: &[&str],
) -> (String, Vec<String>) {
    let yaml = role_file("developer.yaml", namespace, who);
    let rule_line = format!("resources: [\"{resource}\"]");
    // Rules are blocks starting at `  - apiGroups:`; anything unindented
    // (`---`, `kind:`, blank lines) ends one.
    let mut blocks: Vec<Vec<String>> = vec![Vec::new()];
    let mut in_rule = false;
    for line in yaml.lines() {
        if line.starts_with("  - apiGroups:") {
            blocks.push(Vec::new());
            in_rule = true;
        } else if !line.starts_with(' ') && in_rule {
            blocks.push(Vec::new());
            in_rule = false;
        }
        blocks.last_mut().expect("block").push(line.to_owned());
    }
    let mut removed = Vec::new();
    let mut found = 0;
    let mut out = Vec::new();
    for block in blocks {
        if !block.iter().any(|l| l.trim_start() == rule_line) {
            out.extend(block);
            continue;
        }
        found += 1;
        let verbs_line = block
            .iter()
            .find(|l| l.trim_start().starts_with("verbs:"))
            .unwrap_or_else(|| panic!("developer.yaml: the {resource} rule has no verbs"));
        let verbs: Vec<String> = verbs_line
            .split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        let kept: Vec<&String> = verbs
            .iter()
            .filter(|v| keep_verbs.contains(&v.as_str()))
            .collect();
        removed = verbs
            .iter()
            .filter(|v| !keep_verbs.contains(&v.as_str()))
            .cloned()
            .collect();
        if kept.is_empty() {
            continue;
        }
        let kept = kept
            .iter()
            .map(|v| format!("\"{v}\""))
            .collect::<Vec<_>>()
            .join(", ");
        out.extend(block.into_iter().map(|l| {
            if l.trim_start().starts_with("verbs:") {
                format!("    verbs: [{kept}]")
            } else {
                l
            }
        }));
    }
    assert_eq!(
        found, 1,
        "developer.yaml: not exactly one rule of {resource} alone"
    );
    assert!(
        !removed.is_empty(),
        "developer.yaml: no verb removed from {resource}"
    );
    (out.join("\n") + "\n", removed)
}
