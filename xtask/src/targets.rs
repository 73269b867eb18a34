//! `cargo xtask check-targets`: ktb compiles, clippy-clean, for every
//! platform its users work on, from this one Linux machine.
//!
//! Developers' laptops are Linux, macOS and Windows; the agent runs in
//! Linux pods on amd64 and arm64. For each target, `cargo clippy` (which
//! type-checks everything `cargo check` does) runs over the crates built
//! there, `-D warnings`. Nothing is linked, so no target's linker or SDK is
//! needed, only a C compiler for `ring`'s build script (rustls' crypto):
//! musl-gcc for Linux amd64, mingw-w64 for Windows, and clang for the rest.
//! With no Apple SDK or arm64 libc on this machine, clang compiles against a
//! stub of the four C headers ring includes (below): enough to compile
//! ring's objects for type-checking, never to ship; releases are built by
//! `deploy/`'s workflow on each platform's own runner or with zig.

use std::path::Path;
use std::process::Command;

use crate::cluster::on_path;

/// A target to check and what it needs.
struct Target {
    triple: &'static str,
    /// The crates built for it: the CLI's everywhere, the agent's on Linux.
    crates: &'static [&'static str],
    /// The C compiler for ring's build script, and the Debian package
    /// that provides it.
    cc: &'static str,
    package: &'static str,
    /// Whether C is compiled against [`STUB_HEADERS`] (true: clang with no
    /// libc of that target here) or the compiler's own libc (false).
    stub_headers: bool,
}

const CLI: &[&str] = &["ktb", "ktb-proto", "ktb-kube"];
const CLI_AND_AGENT: &[&str] = &["ktb", "ktb-proto", "ktb-kube", "ktb-agent"];

const TARGETS: &[Target] = &[
    Target {
        triple: "x86_64-unknown-linux-musl",
        crates: CLI_AND_AGENT,
        cc: "musl-gcc",
        package: "musl-tools",
        stub_headers: false,
    },
    Target {
        triple: "aarch64-unknown-linux-musl",
        crates: CLI_AND_AGENT,
        cc: "clang",
        package: "clang",
        stub_headers: true,
    },
    Target {
        triple: "x86_64-pc-windows-gnu",
        crates: CLI,
        cc: "x86_64-w64-mingw32-gcc",
        package: "gcc-mingw-w64-x86-64",
        stub_headers: false,
    },
    Target {
        triple: "x86_64-apple-darwin",
        crates: CLI,
        cc: "clang",
        package: "clang",
        stub_headers: true,
    },
    Target {
        triple: "aarch64-apple-darwin",
        crates: CLI,
        cc: "clang",
        package: "clang",
        stub_headers: true,
    },
];

/// The C headers ring includes beyond the compiler's own (`stdint.h`,
/// `stddef.h`, …), declared as Apple's SDK and musl declare them.
const STUB_HEADERS: &[(&str, &str)] = &[
    (
        "TargetConditionals.h",
        "#define TARGET_OS_MAC 1\n#define TARGET_OS_OSX 1\n#define TARGET_OS_IPHONE 0\n\
         #define TARGET_OS_IOS 0\n#define TARGET_OS_WATCH 0\n#define TARGET_OS_TV 0\n\
         #define TARGET_OS_SIMULATOR 0\n",
    ),
    ("assert.h", "#define assert(x) ((void)0)\n"),
    (
        "string.h",
        "#include <stddef.h>\nvoid *memcpy(void *, const void *, size_t);\n\
         void *memmove(void *, const void *, size_t);\nvoid *memset(void *, int, size_t);\n\
         int memcmp(const void *, const void *, size_t);\n",
    ),
    ("stdlib.h", "#include <stddef.h>\nvoid abort(void);\n"),
];

pub fn run(workspace: &Path) -> anyhow::Result<()> {
    let mut missing: Vec<String> = TARGETS
        .iter()
        .filter(|t| !on_path(t.cc))
        .map(|t| format!("{} (apt-get install {})", t.cc, t.package))
        .collect();
    if !on_path("llvm-ar") {
        missing.push("llvm-ar (apt-get install llvm)".into());
    }
    anyhow::ensure!(
        missing.is_empty(),
        "tools for ring's build script are missing: {}",
        missing.join(", ")
    );
    let stub = workspace.join("target/xtask/stub-c-headers");
    std::fs::create_dir_all(&stub)?;
    for (name, text) in STUB_HEADERS {
        std::fs::write(stub.join(name), text)?;
    }
    let mut failed = Vec::new();
    for target in TARGETS {
        println!("\n=== {}: {}", target.triple, target.crates.join(", "));
        let env_name = target.triple.replace('-', "_");
        let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        command
            .current_dir(workspace)
            .args(["clippy", "--target", target.triple])
            .args(target.crates.iter().flat_map(|c| ["-p", c]))
            .args(["--", "-D", "warnings"])
            .env(format!("CC_{env_name}"), target.cc);
        if target.stub_headers {
            command.env(format!("AR_{env_name}"), "llvm-ar").env(
                format!("CFLAGS_{env_name}"),
                format!("-nostdlibinc -I{}", stub.display()),
            );
        }
        if !command.status()?.success() {
            failed.push(target.triple);
        }
    }
    anyhow::ensure!(failed.is_empty(), "clippy failed for {}", failed.join(", "));
    println!("\nEvery target is clippy-clean.");
    Ok(())
}
