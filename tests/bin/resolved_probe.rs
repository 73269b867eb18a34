//! The half of `tests/resolved_e2e.rs` that runs inside its sandbox (a
//! network and mount namespace with its own systemd-resolved), started by
//! that test as a program of its own so that it can never run, and pass,
//! anywhere else:
//!
//! - `resolved-probe sandbox ROOT`: ktb's library creates its TUN device,
//!   registers it with resolved (ROOT is the unpacked systemd package),
//!   checks lookups through resolved's stub as programs make them, and
//!   undoes everything through the journal, also after a simulated crash;
//! - `resolved-probe refused NAME:INDEX SAYING`: registering that device
//!   must fail with an error containing SAYING (run by `sandbox` as
//!   another user, or with an unreachable bus).

use std::path::Path;
use std::time::Duration;

use ktb::connect::journal::{journal_path, Journal};
use ktb::connect::{dns, resolved, system};
use ktb_proto::handshake::Resolver;
use ktb_tests::cluster::run_bounded;
use ktb_tests::resolved::{FakeUpstream, OUTSIDE, OUTSIDE_IP, SERVICE, SERVICE_IP};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["sandbox", root] => inside_the_sandbox(Path::new(root)),
        ["refused", device, saying] => refused_registration(device, saying),
        _ => {
            eprintln!("usage: resolved-probe sandbox ROOT | refused NAME:INDEX SAYING");
            std::process::exit(2);
        }
    }
}

/// Registers with the sandbox's resolved as connect does, checks what
/// programs see, is refused as others, and undoes it all.
fn inside_the_sandbox(root: &Path) {
    let resolvectl = |args: &[&str]| {
        let mut cmd = std::process::Command::new(root.join("usr/bin/resolvectl"));
        cmd.args(args);
        let out = run_bounded(cmd, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "resolvectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let getent = |name: &str| {
        let mut cmd = std::process::Command::new("getent");
        cmd.args(["hosts", name]);
        let out = run_bounded(cmd, Duration::from_secs(30));
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    assert!(
        std::fs::read_link("/etc/resolv.conf")
            .unwrap()
            .ends_with("stub-resolv.conf"),
        "the sandbox's resolv.conf is not resolved's stub"
    );
    assert!(matches!(
        system::resolv_conf_kind(std::path::Path::new(system::RESOLV_CONF)),
        system::ResolvConf::ResolvedStub(_)
    ));
    // ktb's resolver, standing in: answers the cluster's one Service.
    let ktb_dns = FakeUpstream::start_here(dns::LISTEN, &[(SERVICE, SERVICE_IP)]);
    let agent = Resolver {
        nameservers: vec!["10.96.0.10:53".parse().unwrap()],
        search: [
            "team-a.svc.cluster.local",
            "svc.cluster.local",
            "cluster.local",
        ]
        .map(String::from)
        .to_vec(),
    };
    let domains = resolved::link_domains(&agent).unwrap();
    let state = std::env::temp_dir().join(format!("ktb-resolved-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // ktb's device, and its link registered with resolved, as connect does.
    let register = |journal: &mut Journal, device: &system::OwnDevice| {
        rt.block_on(resolved::register(journal, device, dns::LISTEN, &domains))
            .unwrap()
    };
    let up = |journal: &mut Journal| {
        let (tun, device) = rt
            .block_on(async { system::create_device(journal, "ktb0") })
            .unwrap();
        register(journal, &device);
        (tun, device)
    };

    // Registered: the link has ktb's server and the domains, no other does.
    let mut journal = Journal::start(&state).unwrap();
    let (tun, device) = up(&mut journal);
    let link = resolvectl(&["status", "ktb0"]);
    assert!(link.contains("127.0.0.153"), "{link}");
    let on_link = resolvectl(&["domain", "ktb0"]);
    assert!(
        on_link.contains("team-a.svc.cluster.local svc.cluster.local ~cluster.local"),
        "{on_link}"
    );
    let every = resolvectl(&["domain"]);
    let holding: Vec<&str> = every
        .lines()
        .filter(|l| l.contains("cluster.local"))
        .collect();
    assert_eq!(
        holding.len(),
        1,
        "the domains are on one link only: {every}"
    );
    assert!(holding[0].contains("(ktb0)"), "{every}");
    assert!(
        resolvectl(&["status", "ktb0"]).contains("-DefaultRoute"),
        "ktb0 must not be a default route for names"
    );

    // Lookups as programs make them, through resolved's stub.
    let answered = getent(SERVICE).expect("the Service's name through resolved");
    assert!(answered.starts_with(&SERVICE_IP.to_string()), "{answered}");
    let short = getent("web").expect("a short name, completed by the search domains");
    assert!(short.starts_with(&SERVICE_IP.to_string()), "{short}");
    let outside = getent(OUTSIDE).expect("a name outside the cluster, by the laptop's server");
    assert!(outside.starts_with(&OUTSIDE_IP.to_string()), "{outside}");
    // ktb's "no such name" reaches the program as resolved's NXDOMAIN.
    let missing = "missing.team-a.svc.cluster.local";
    let mut query = std::process::Command::new(root.join("usr/bin/resolvectl"));
    query.args(["query", "--cache=no", missing]);
    let out = run_bounded(query, Duration::from_secs(30));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("not found"),
        "{missing}: {said}"
    );
    let asked = ktb_dns.asked();
    assert!(
        asked.iter().any(|n| n == SERVICE),
        "ktb was asked {asked:?}"
    );
    assert!(
        asked.iter().all(|n| n.ends_with("cluster.local")),
        "ktb's server was asked a name outside the cluster's domains: {asked:?}"
    );

    // Refused: as a user polkit does not let through (no polkit here, so
    // nobody but root), and with no system bus. Each says what to do, and
    // the link keeps what root registered.
    let exe = std::env::current_exe().unwrap();
    let refused = |program: &str, before: &[&str], bus: Option<&str>, saying: &str| {
        let mut cmd = std::process::Command::new(program);
        cmd.args(before)
            .arg(&exe)
            .arg("refused")
            .arg(format!("{}:{}", device.name, device.index))
            .arg(saying);
        if let Some(bus) = bus {
            cmd.env("DBUS_SYSTEM_BUS_ADDRESS", bus);
        }
        let out = run_bounded(cmd, Duration::from_secs(60));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.contains("refused as expected"),
            "{said}"
        );
        if let Some(line) = said.lines().find(|l| l.contains("refused as expected")) {
            println!("{line}");
        }
    };
    refused(
        "setpriv",
        &["--reuid=65534", "--regid=65534", "--clear-groups", "--"],
        None,
        "run ktb as root",
    );
    refused(
        "env",
        &[],
        Some("unix:path=/nonexistent/ktb-test-bus"),
        "system bus cannot be reached",
    );
    assert!(resolvectl(&["status", "ktb0"]).contains("127.0.0.153"));

    // RevertLink itself, with the device still there.
    resolved::revert(&device).unwrap();
    let reverted = resolvectl(&["status", "ktb0"]);
    assert!(!reverted.contains("127.0.0.153"), "{reverted}");
    assert!(!resolvectl(&["domain"]).contains("cluster.local"));

    // On exit: the journal undoes the registration, the routes, the device.
    register(&mut journal, &device);
    assert!(resolvectl(&["domain"]).contains("~cluster.local"));
    journal.undo().unwrap();
    drop(tun);
    assert!(!journal_path(&state).exists(), "the journal is kept");
    assert!(!resolvectl(&["domain"]).contains("cluster.local"));
    assert!(!std::path::Path::new("/sys/class/net/ktb0").exists());
    assert_eq!(getent(SERVICE), None, "the Service still resolves");

    // A crash: ktb dies, its device with it; `clean --local` finds the
    // journal and has nothing of resolved's left to take back.
    let mut journal = Journal::start(&state).unwrap();
    let (tun, _device) = up(&mut journal);
    drop(journal);
    drop(tun);
    let left = Journal::load(&journal_path(&state))
        .unwrap()
        .expect("journal");
    left.undo().unwrap();
    assert!(!resolvectl(&["domain"]).contains("cluster.local"));
    let _ = std::fs::remove_dir_all(&state);
    println!("inside the sandbox: all checked");
}

/// Registration that must be refused (run by [`inside_the_sandbox`] as
/// another user or with another bus): the error says what to do.
fn refused_registration(device: &str, saying: &str) {
    let (name, index) = device.split_once(':').expect("NAME:INDEX");
    let device = system::OwnDevice {
        name: name.to_owned(),
        index: index.parse().expect("index"),
    };
    let state = std::env::temp_dir().join(format!("ktb-resolved-refused-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let mut journal = Journal::start(&state).unwrap();
    let domains = resolved::link_domains(&Resolver {
        nameservers: Vec::new(),
        search: vec!["svc.cluster.local".into()],
    })
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let error = rt
        .block_on(resolved::register(
            &mut journal,
            &device,
            dns::LISTEN,
            &domains,
        ))
        .expect_err("registration was not refused");
    let message = format!("{error:#}");
    assert!(message.contains(saying), "{message}");
    assert!(message.contains("--dns hosts"), "{message}");
    drop(journal);
    let _ = std::fs::remove_dir_all(&state);
    println!("refused as expected: {message}");
}
