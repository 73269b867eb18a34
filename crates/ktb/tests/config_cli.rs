//! `ktb config` end to end, without a cluster: the built binary with its
//! config file and kubeconfig in a temporary directory, as a developer
//! would type the commands.

use std::path::Path;
use std::process::{Command, Output};

/// `ktb ARGS` with the config file and kubeconfig of `dir`, and none of the
/// caller's variables that would change the defaults.
fn ktb(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ktb"))
        .args(args)
        .env("KTB_CONFIG", dir.join("config.toml"))
        .env("KUBECONFIG", dir.join("kubeconfig"))
        .env_remove("KTB_AGENT_IMAGE")
        .env_remove("KTB_IMAGE_PULL_POLICY")
        .output()
        .expect("runs ktb")
}

/// Standard output of a run that must succeed.
fn ok(dir: &Path, args: &[&str]) -> String {
    let output = ktb(dir, args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ktb {args:?}: {stderr}");
    String::from_utf8(output.stdout).expect("text")
}

/// Standard error of a run that must fail with exit code 1.
fn refused(dir: &Path, args: &[&str]) -> String {
    let output = ktb(dir, args);
    assert_eq!(output.status.code(), Some(1), "ktb {args:?}");
    String::from_utf8(output.stderr).expect("text")
}

fn kube_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let yaml = "apiVersion: v1\nkind: Config\ncurrent-context: staging\ncontexts:\n\
                - name: staging\n  context: {cluster: c, user: u, namespace: stage-ns}\n\
                - name: prod\n  context: {cluster: c, user: u}\n";
    std::fs::write(dir.path().join("kubeconfig"), yaml).expect("kubeconfig");
    dir
}

#[test]
fn set_get_show_unset_for_every_context_and_for_one() {
    let dir = kube_dir();
    let dir = dir.path();
    assert!(ok(dir, &["config", "set", "grace", "45s"]).starts_with("set grace = 45s in "));
    let profile = ok(dir, &["config", "set", "grace", "60s", "--current-context"]);
    assert!(profile.contains("for context staging"), "{profile}");
    assert_eq!(ok(dir, &["config", "get", "grace"]), "60s\n");
    assert_eq!(
        ok(dir, &["--context", "prod", "config", "get", "grace"]),
        "45s\n"
    );
    assert_eq!(ok(dir, &["config", "get", "namespace"]), "stage-ns\n");
    assert!(ok(dir, &["connect", "--help"]).contains("[default: 60s]"));

    let show = ok(dir, &["config", "show", "-o", "json"]);
    let show: serde_json::Value = serde_json::from_str(&show).expect("json");
    assert_eq!(show["context"], "staging");
    let grace = &show["keys"][4];
    assert_eq!(
        (&grace["key"], &grace["source"]),
        (&"grace".into(), &"context staging".into())
    );

    assert!(refused(dir, &["config", "set", "grace", "abc"]).contains("invalid duration"));
    assert!(refused(dir, &["config", "get", "graze"]).contains("unknown key `graze`"));
    ok(
        dir,
        &["config", "unset", "grace", "--for-context", "staging"],
    );
    assert_eq!(ok(dir, &["config", "get", "grace"]), "45s\n");
}

#[test]
fn a_bad_file_stops_a_command_before_the_cluster() {
    let dir = kube_dir();
    let dir = dir.path();
    std::fs::write(dir.join("config.toml"), "# defaults\ngrace = \"soon\"\n").expect("config");
    let error = refused(dir, &["status"]);
    let expected = format!(
        "{}, line 2: grace: invalid value 'soon'",
        dir.join("config.toml").display()
    );
    assert!(error.contains(&expected), "{error}");
}
