//! The config file: defaults for ktb's flags that outlive one command,
//! for every kubeconfig context or for one (kt-connect's `ktctl config`).
//!
//! The file is `$KTB_CONFIG`, else `ktb/config.toml` in the platform's
//! config directory. Its top-level keys apply everywhere; a
//! `[context.NAME]` table overrides them while NAME is the kubeconfig
//! context in use (`--context`, else the kubeconfig's current-context).
//!
//! The library never sees the file. Before the real parse of the command
//! line, each configured key becomes the `default_value` of the flags it
//! stands for, and clap does the rest as for any default: a flag, or the
//! flag's environment variable, still wins; `--help` shows the configured
//! value; the flag's own parser converts it. That parser also checks every
//! value when the file is read, so a bad value is reported with the file
//! and line instead of as a flag nobody typed, and when `ktb config set`
//! writes one, so it is refused before it reaches the file.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use clap::builder::Resettable;
use clap::parser::ValueSource;
use clap::{Arg, Command};
use kube::config::Kubeconfig;
use toml_edit::{DocumentMut, InlineTable, Item, Table, TableLike};

/// A key of the config file and the flag it gives a default to.
pub struct Key {
    /// The key in the file: the flag's own spelling (`grace`,
    /// `agent-image`), except `connect-mode` for connect's `--mode`, which
    /// would otherwise be confused with exchange's.
    pub name: &'static str,
    /// The flag's clap id: its field name (`agent_image`).
    arg: &'static str,
    /// The subcommands that have the flag; empty for a global flag, which
    /// is set on the top-level command and copied by clap to every
    /// subcommand.
    commands: &'static [&'static str],
    /// Written as a TOML integer (`dns-cache-ttl = 30`) rather than a string.
    integer: bool,
}

const AGENT_COMMANDS: &[&str] = &["exchange", "mesh", "preview", "connect"];
/// The commands that start an agent pod, for its image, pull policy and
/// ready timeout: the session commands and `doctor`, whose throwaway agent
/// has no grace to configure.
const AGENT_POD_COMMANDS: &[&str] = &["exchange", "mesh", "preview", "connect", "doctor"];

/// Every key the file may set, in the order `ktb config show` lists them.
pub const KEYS: &[Key] = &[
    Key {
        name: "namespace",
        arg: "namespace",
        commands: &[],
        integer: false,
    },
    Key {
        name: "agent-image",
        arg: "agent_image",
        commands: AGENT_POD_COMMANDS,
        integer: false,
    },
    Key {
        name: "image-pull-policy",
        arg: "image_pull_policy",
        commands: AGENT_POD_COMMANDS,
        integer: false,
    },
    Key {
        name: "ready-timeout",
        arg: "ready_timeout",
        commands: AGENT_POD_COMMANDS,
        integer: false,
    },
    Key {
        name: "grace",
        arg: "grace",
        commands: AGENT_COMMANDS,
        integer: false,
    },
    Key {
        name: "transport",
        arg: "transport",
        commands: &["exchange", "mesh", "preview"],
        integer: false,
    },
    Key {
        name: "connect-mode",
        arg: "mode",
        commands: &["connect"],
        integer: false,
    },
    Key {
        name: "dns",
        arg: "dns",
        commands: &["connect"],
        integer: false,
    },
    Key {
        name: "dns-cache-ttl",
        arg: "dns_cache_ttl",
        commands: &["connect"],
        integer: true,
    },
];

/// The table of per-context profiles: `[context.NAME]`.
const PROFILES: &str = "context";

/// The key named `name`, or an error listing the keys there are.
pub fn key(name: &str) -> anyhow::Result<&'static Key> {
    KEYS.iter().find(|key| key.name == name).ok_or_else(|| {
        let names: Vec<&str> = KEYS.iter().map(|key| key.name).collect();
        anyhow!("unknown key `{name}`; the keys are {}", names.join(", "))
    })
}

/// Where the config file is: `$KTB_CONFIG`, else `ktb/config.toml` in the
/// platform's config directory; `None` when there is no home to put it in.
/// `var` reads an environment variable, so that tests can pass their own.
pub fn locate(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(path) = set("KTB_CONFIG") {
        return Some(path);
    }
    let dir = if cfg!(windows) {
        set("APPDATA")
    } else if cfg!(target_os = "macos") {
        set("HOME").map(|home| home.join("Library/Application Support"))
    } else {
        // The XDG spec ignores a relative XDG_CONFIG_HOME.
        let xdg = set("XDG_CONFIG_HOME").filter(|dir| dir.is_absolute());
        xdg.or_else(|| set("HOME").map(|home| home.join(".config")))
    };
    Some(dir?.join("ktb").join("config.toml"))
}

/// The config file as it bears on this run of ktb.
pub struct Config {
    /// The file, which may not exist; `None` when there is no telling where
    /// it would be (no KTB_CONFIG and no home directory).
    path: Option<PathBuf>,
    contents: Contents,
    /// `--kubeconfig` from the command line, which leads to the context.
    kubeconfig: Option<PathBuf>,
    /// `--context` from the command line: the context, when given.
    context: Option<String>,
    /// The kubeconfig context in use, read on first need: without profiles
    /// in the file, a command never reads the kubeconfig for this.
    kube: OnceCell<KubeContext>,
}

/// The kubeconfig context in use, for choosing a profile.
#[derive(Default)]
struct KubeContext {
    /// `--context`, else the kubeconfig's current-context; `None` when
    /// neither is there or the kubeconfig cannot be read (the command
    /// itself reports that later, if it needs a cluster).
    name: Option<String>,
    /// The context's own namespace, when it names one.
    namespace: Option<String>,
}

impl Config {
    /// Reads the file at `path` (a missing file sets nothing) and notes the
    /// `--kubeconfig` and `--context` of `args`, the command line that
    /// `cli` will parse.
    pub fn load(path: Option<PathBuf>, cli: &Command, args: &[OsString]) -> anyhow::Result<Config> {
        let contents = match &path {
            Some(path) => Contents::read(path, cli)?,
            None => Contents::default(),
        };
        let (kubeconfig, context) = kube_flags(cli, args);
        Ok(Config {
            path,
            contents,
            kubeconfig,
            context,
            kube: OnceCell::new(),
        })
    }

    /// The file's path, or why there is none.
    pub fn path(&self) -> anyhow::Result<&Path> {
        self.path.as_deref().ok_or_else(|| {
            anyhow!("cannot tell where the config file goes: set KTB_CONFIG to its path, or HOME")
        })
    }

    /// The kubeconfig context whose profile applies, if any.
    pub fn context_in_use(&self) -> Option<&str> {
        self.kube().name.as_deref()
    }

    fn kube(&self) -> &KubeContext {
        self.kube
            .get_or_init(|| kube_context(self.kubeconfig.as_deref(), self.context.clone()))
    }

    /// `cli` with the file's values as the defaults of their flags.
    pub fn apply(&self, cli: Command) -> Command {
        apply(cli, &self.layer())
    }

    /// What the file sets for this run: the profile of the context in use
    /// over the top-level keys, in [`KEYS`] order.
    fn layer(&self) -> Vec<Setting> {
        let profile = if self.contents.profiles.is_empty() {
            None
        } else {
            let name = self.context_in_use();
            name.and_then(|name| Some((name, self.contents.profiles.get(name)?)))
        };
        KEYS.iter()
            .filter_map(|key| {
                let in_profile = profile.and_then(|(name, values)| {
                    Some((lookup(values, key)?, Source::Context(name.to_owned())))
                });
                let (value, source) = in_profile
                    .or_else(|| Some((lookup(&self.contents.global, key)?, Source::Config)))?;
                Some(Setting {
                    key,
                    value: value.to_owned(),
                    source,
                })
            })
            .collect()
    }

    /// Every key's value for a command that leaves its flag out, and where
    /// that value comes from; `cli` is the command line's definition,
    /// without the file's defaults.
    pub fn effective(&self, cli: &Command) -> anyhow::Result<Vec<Effective>> {
        let layer = self.layer();
        let cli = apply(cli.clone(), &layer);
        KEYS.iter()
            .map(|key| {
                let (value, source) = unflagged(&cli, key)?;
                let configured = layer.iter().find(|setting| setting.key.name == key.name);
                let source = match (source, configured) {
                    (Some(ValueSource::EnvVariable), _) => {
                        let env = flag(&cli, key).get_env().unwrap_or_default();
                        Source::Env(env.to_string_lossy().into_owned())
                    }
                    (_, Some(setting)) => setting.source.clone(),
                    _ => Source::Default,
                };
                Ok(match value {
                    Some(value) => Effective { key, value, source },
                    None => self.context_namespace(key),
                })
            })
            .collect()
    }

    /// Where the library takes the namespace from when nothing sets it (the
    /// only key without a built-in default): the kubeconfig context's
    /// namespace, else `default`.
    fn context_namespace(&self, key: &'static Key) -> Effective {
        match &self.kube().namespace {
            Some(namespace) => Effective {
                key,
                value: namespace.clone(),
                source: Source::Kubeconfig,
            },
            None => Effective {
                key,
                value: "default".to_owned(),
                source: Source::Default,
            },
        }
    }
}

/// A key's value for this run, had its flag been left out.
pub struct Effective {
    pub key: &'static Key,
    /// As the flag would take it (`60s`, `port-forward`).
    pub value: String,
    /// The first of environment, profile, top-level key, kubeconfig
    /// (namespace) or built-in default that gives a value.
    pub source: Source,
}

/// Where a value comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// ktb's built-in default.
    Default,
    /// The flag's environment variable, by name (`KTB_AGENT_IMAGE`).
    Env(String),
    /// A top-level key of the config file.
    Config,
    /// The config file's profile of this kubeconfig context.
    Context(String),
    /// The kubeconfig context's namespace (for `namespace` only).
    Kubeconfig,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::Env(name) => write!(f, "env {name}"),
            Source::Config => f.write_str("config"),
            Source::Context(name) => write!(f, "context {name}"),
            Source::Kubeconfig => f.write_str("kubeconfig"),
        }
    }
}

/// A value the file sets for this run, and whether it is top-level
/// ([`Source::Config`]) or a profile's ([`Source::Context`]).
struct Setting {
    key: &'static Key,
    value: String,
    source: Source,
}

/// `cli` with each of `layer`'s values as the default of its flags.
fn apply(mut cli: Command, layer: &[Setting]) -> Command {
    for Setting { key, value, .. } in layer {
        let default = |arg: Arg| arg.default_value(value.clone());
        if key.commands.is_empty() {
            cli = cli.mut_arg(key.arg, default);
        }
        for name in key.commands {
            cli = cli.mut_subcommand(name, |sub| sub.mut_arg(key.arg, default));
        }
    }
    cli
}

/// `key`'s flag as `cli` defines it.
fn flag<'c>(cli: &'c Command, key: &Key) -> &'c Arg {
    let owner = match key.commands.first() {
        Some(name) => cli
            .find_subcommand(name)
            .expect("KEYS name real subcommands"),
        None => cli,
    };
    owner
        .get_arguments()
        .find(|arg| arg.get_id() == key.arg)
        .expect("KEYS name real flags")
}

/// A command of `flag` alone, so that clap parses one value as it would on
/// the full command line, without the rest of that command line.
fn alone(flag: Arg) -> Command {
    Command::new("ktb")
        .no_binary_name(true)
        .disable_help_flag(true)
        .arg(flag)
}

/// Refuses a `value` that `key`'s flag would refuse, with the flag's own
/// words ("invalid value 'abc' for '--grace <GRACE>': invalid duration …").
pub fn check(cli: &Command, key: &Key, value: &str) -> anyhow::Result<()> {
    if value.is_empty() {
        bail!(
            "empty value; `ktb config unset {}` removes the key",
            key.name
        );
    }
    let flag = flag(cli, key)
        .clone()
        .env(Resettable::Reset)
        .default_value(Resettable::Reset);
    let long = flag.get_long().expect("KEYS name long flags");
    // `--flag=value`, so that a value starting with `-` is still a value.
    let argv = [format!("--{long}={value}")];
    alone(flag)
        .try_get_matches_from(argv)
        .map(drop)
        .map_err(clap_words)
}

/// The value `key`'s flag gets when the command line leaves it out, from
/// its environment variable or its default in `cli`, and which of the two.
fn unflagged(cli: &Command, key: &Key) -> anyhow::Result<(Option<String>, Option<ValueSource>)> {
    let matches = alone(flag(cli, key).clone())
        .try_get_matches_from(Vec::<OsString>::new())
        .map_err(clap_words)
        .with_context(|| format!("{}'s environment variable", key.name))?;
    let value = matches
        .get_raw(key.arg)
        .and_then(|mut values| values.next())
        .map(|value| value.to_string_lossy().into_owned());
    Ok((value, matches.value_source(key.arg)))
}

/// clap's error as one line, without its "error:" and usage: what a config
/// error wraps in its own context.
fn clap_words(error: clap::Error) -> anyhow::Error {
    let text = error.to_string();
    let first_paragraph = text.split("\n\n").next().unwrap_or_default();
    let words: Vec<&str> = first_paragraph.split_whitespace().collect();
    let line = words.join(" ");
    anyhow!("{}", line.strip_prefix("error: ").unwrap_or(&line))
}

/// `--kubeconfig` and `--context` as `cli` would read them from `args`, a
/// command line not checked yet: the flags before any unknown one count
/// (the real parse then refuses the unknown one anyway).
fn kube_flags(cli: &Command, args: &[OsString]) -> (Option<PathBuf>, Option<String>) {
    // Without their help and version flags, clap does not stop at them, so
    // `ktb --context staging exchange --help` shows staging's defaults.
    let lenient = cli
        .clone()
        .ignore_errors(true)
        .disable_help_flag(true)
        .disable_version_flag(true)
        .disable_help_subcommand(true);
    match lenient.try_get_matches_from(args) {
        Ok(matches) => (
            matches.get_one::<PathBuf>("kubeconfig").cloned(),
            matches.get_one::<String>("context").cloned(),
        ),
        Err(_) => (None, None),
    }
}

/// The kubeconfig context in use: `context` (the flag), else the current
/// context of `kubeconfig` (the flag), else of `$KUBECONFIG` or
/// `~/.kube/config`, found as the library finds it.
fn kube_context(kubeconfig: Option<&Path>, context: Option<String>) -> KubeContext {
    let file = match kubeconfig {
        Some(path) => Kubeconfig::read_from(path),
        None => Kubeconfig::read(),
    }
    .ok();
    let name = context.or_else(|| file.as_ref()?.current_context.clone());
    let name = name.filter(|name| !name.is_empty());
    let namespace = file.and_then(|file| {
        let named = file
            .contexts
            .into_iter()
            .find(|c| Some(&c.name) == name.as_ref())?;
        named.context?.namespace
    });
    KubeContext { name, namespace }
}

/// Checked values by key, in the file's order.
type Values = Vec<(&'static Key, String)>;

fn lookup<'v>(values: &'v Values, key: &Key) -> Option<&'v str> {
    values
        .iter()
        .find(|(k, _)| k.name == key.name)
        .map(|(_, value)| value.as_str())
}

/// What the file sets.
#[derive(Default)]
struct Contents {
    /// The top-level keys: every context's.
    global: Values,
    /// The `[context.NAME]` tables, by kubeconfig context name.
    profiles: BTreeMap<String, Values>,
}

impl Contents {
    /// Reads and checks the file; a missing file sets nothing.
    fn read(path: &Path, cli: &Command) -> anyhow::Result<Contents> {
        let text = read_text(path)?.unwrap_or_default();
        Reader {
            path,
            text: &text,
            cli,
        }
        .contents()
    }
}

/// The file's text; `None` when there is no file.
fn read_text(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => bail!(
            "cannot read the config file {}: {e}; fix it, or set KTB_CONFIG to another file",
            path.display()
        ),
    }
}

/// Checking one file's text, for errors that name the file and line.
struct Reader<'a> {
    path: &'a Path,
    text: &'a str,
    cli: &'a Command,
}

impl Reader<'_> {
    fn contents(&self) -> anyhow::Result<Contents> {
        let document = toml_edit::Document::parse(self.text)
            .map_err(|e| syntax_error(self.path, self.text, &e))?;
        let root = document.as_table();
        let mut contents = Contents::default();
        for (name, item) in root.iter() {
            if name == PROFILES {
                contents.profiles = self.profiles(root, item)?;
            } else {
                contents.global.push(self.setting(root, name, item)?);
            }
        }
        Ok(contents)
    }

    fn profiles(&self, root: &Table, item: &Item) -> anyhow::Result<BTreeMap<String, Values>> {
        let not_tables = |table: &dyn TableLike, name: &str| {
            self.error(
                key_span(table, name),
                format_args!("`{name}` is not a table"),
                "profiles are tables: [context.NAME], NAME a kubeconfig context",
            )
        };
        let profiles = item
            .as_table_like()
            .ok_or_else(|| not_tables(root, PROFILES))?;
        profiles
            .iter()
            .map(|(name, item)| {
                let profile = item
                    .as_table_like()
                    .ok_or_else(|| not_tables(profiles, name))?;
                let values = profile.iter().map(|(k, v)| self.setting(profile, k, v));
                Ok((name.to_owned(), values.collect::<anyhow::Result<_>>()?))
            })
            .collect()
    }

    fn setting(
        &self,
        table: &dyn TableLike,
        name: &str,
        item: &Item,
    ) -> anyhow::Result<(&'static Key, String)> {
        let span = key_span(table, name);
        let key = key(name).map_err(|e| self.error(span.clone(), e, "fix or remove the line"))?;
        let value = match (item.as_str(), item.as_integer()) {
            (Some(text), _) => text.to_owned(),
            (None, Some(number)) => number.to_string(),
            (None, None) => {
                let what = format_args!("{name} is a TOML {}, not a string", item.type_name());
                return Err(self.error(span, what, "quote the value"));
            }
        };
        check(self.cli, key, &value)
            .map_err(|e| self.error(span, format_args!("{name}: {e}"), "fix or remove the line"))?;
        Ok((key, value))
    }

    fn error(
        &self,
        span: Option<Range<usize>>,
        what: impl fmt::Display,
        todo: &str,
    ) -> anyhow::Error {
        anyhow!("{}: {what}; {todo}", position(self.path, self.text, span))
    }
}

fn key_span(table: &dyn TableLike, name: &str) -> Option<Range<usize>> {
    table.key(name).and_then(toml_edit::Key::span)
}

/// `FILE, line N` for the byte range `span` of `text`, or just the file.
fn position(path: &Path, text: &str, span: Option<Range<usize>>) -> String {
    match span.and_then(|span| text.get(..span.start)) {
        Some(before) => format!(
            "{}, line {}",
            path.display(),
            before.matches('\n').count() + 1
        ),
        None => path.display().to_string(),
    }
}

fn syntax_error(path: &Path, text: &str, error: &toml_edit::TomlError) -> anyhow::Error {
    let message = error.message().trim_end();
    anyhow!(
        "{}: not TOML: {message}; fix the file, or remove it",
        position(path, text, error.span())
    )
}

/// Sets `key` to `value` (checked by [`check`]) in the file at `path`: at
/// the top level, or in the profile of `context`. The rest of the file is
/// kept, comments included; the file and its directory are made if needed.
pub fn set(path: &Path, key: &Key, value: &str, context: Option<&str>) -> anyhow::Result<()> {
    let mut document = read_for_edit(path)?;
    let mut value = match value.parse::<i64>() {
        Ok(number) if key.integer => toml_edit::Value::from(number),
        _ => toml_edit::Value::from(value),
    };
    let table = table_for(&mut document, context, path)?;
    match table.get_mut(key.name) {
        // In place, so that the comments around the key stay.
        Some(Item::Value(old)) => {
            *value.decor_mut() = old.decor().clone();
            *old = value;
        }
        _ => {
            table.insert(key.name, Item::Value(value));
        }
    }
    write(path, &document)
}

/// Removes `key` from the file at `path`: at the top level, or from the
/// profile of `context`, dropping a profile left empty. `false` when the
/// key was not there (the file is then left alone).
pub fn unset(path: &Path, key: &Key, context: Option<&str>) -> anyhow::Result<bool> {
    let mut document = read_for_edit(path)?;
    let removed = match context {
        None => document.remove(key.name).is_some(),
        Some(context) => remove_from_profile(&mut document, context, key),
    };
    if removed {
        write(path, &document)?;
    }
    Ok(removed)
}

fn remove_from_profile(document: &mut DocumentMut, context: &str, key: &Key) -> bool {
    let Some(profiles) = document.get_mut(PROFILES).and_then(Item::as_table_like_mut) else {
        return false;
    };
    let Some(profile) = profiles.get_mut(context).and_then(Item::as_table_like_mut) else {
        return false;
    };
    let removed = profile.remove(key.name).is_some();
    if profile.is_empty() {
        profiles.remove(context);
    }
    if profiles.is_empty() {
        document.remove(PROFILES);
    }
    removed
}

fn read_for_edit(path: &Path) -> anyhow::Result<DocumentMut> {
    let text = read_text(path)?.unwrap_or_default();
    text.parse::<DocumentMut>()
        .map_err(|e| syntax_error(path, &text, &e))
}

/// The table a key goes in: the top level, or the profile of `context`,
/// made as needed (of the same kind, `[table]` or `{ inline }`, as the
/// table holding it).
fn table_for<'d>(
    document: &'d mut DocumentMut,
    context: Option<&str>,
    path: &Path,
) -> anyhow::Result<&'d mut dyn TableLike> {
    let Some(context) = context else {
        return Ok(document.as_table_mut());
    };
    let not_a_table = |name: &str| {
        anyhow!(
            "{}: `{name}` is not a table; fix the file: profiles are tables, [context.NAME]",
            path.display()
        )
    };
    let profiles = document.entry(PROFILES).or_insert_with(|| {
        let mut table = Table::new();
        // `[context.NAME]` headers only, no empty `[context]` above them.
        table.set_implicit(true);
        Item::Table(table)
    });
    let inline = profiles.is_inline_table();
    let profiles = profiles
        .as_table_like_mut()
        .ok_or_else(|| not_a_table(PROFILES))?;
    let profile = profiles.entry(context).or_insert_with(|| match inline {
        true => toml_edit::value(InlineTable::new()),
        false => Item::Table(Table::new()),
    });
    profile
        .as_table_like_mut()
        .ok_or_else(|| not_a_table(context))
}

/// Writes in place rather than by rename, so that a config file that is a
/// symlink into someone's dotfiles stays one.
fn write(path: &Path, document: &DocumentMut) -> anyhow::Result<()> {
    let cannot = || {
        format!(
            "cannot write the config file {}; check its directory's permissions, or set KTB_CONFIG to another file",
            path.display()
        )
    };
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(cannot)?;
    }
    std::fs::write(path, document.to_string()).with_context(cannot)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::CommandFactory;

    use super::*;
    use crate::{parse_cli, Cli};

    /// A temporary directory with a kubeconfig whose current context is
    /// `staging` (namespace `stage-ns`) and which also has `prod`.
    fn kube_dir() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = dir.path().join("kubeconfig");
        let yaml = "apiVersion: v1\nkind: Config\ncurrent-context: staging\ncontexts:\n\
                    - name: staging\n  context: {cluster: c, user: u, namespace: stage-ns}\n\
                    - name: prod\n  context: {cluster: c, user: u}\n";
        std::fs::write(&kubeconfig, yaml).expect("write kubeconfig");
        (dir, kubeconfig)
    }

    fn write_config(dir: &Path, toml: &str) -> PathBuf {
        let path = dir.join("config.toml");
        std::fs::write(&path, toml).expect("write config");
        path
    }

    fn args(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    /// `ktb --kubeconfig KUBECONFIG <words>` parsed over the config file
    /// `config`, as `ktb` does it.
    fn parse(config: &Path, kubeconfig: &Path, words: &[&str]) -> Cli {
        let mut argv = args(&["ktb", "--kubeconfig"]);
        argv.push(kubeconfig.into());
        argv.extend(args(words));
        parse_cli(&argv, Some(config.to_owned())).expect("parses").0
    }

    fn grace(cli: Cli) -> Duration {
        match cli.command {
            crate::Command::Connect(args) => ktb::connect::ConnectOptions::from(args).grace,
            _ => panic!("not connect"),
        }
    }

    #[test]
    fn the_file_is_ktb_config_else_in_the_platform_config_dir() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                let found = vars.iter().find(|(var, _)| *var == name);
                found.map(|(_, value)| OsString::from(value))
            }
        };
        let both = env(&[("KTB_CONFIG", "/etc/ktb.toml"), ("HOME", "/home/a")]);
        assert_eq!(locate(both), Some(PathBuf::from("/etc/ktb.toml")));
        assert_eq!(locate(env(&[])), None);
        if cfg!(target_os = "linux") {
            let home = env(&[("HOME", "/home/a"), ("KTB_CONFIG", "")]);
            let xdg = env(&[("HOME", "/home/a"), ("XDG_CONFIG_HOME", "/xdg")]);
            let relative = env(&[("HOME", "/home/a"), ("XDG_CONFIG_HOME", "xdg")]);
            let home_config = PathBuf::from("/home/a/.config/ktb/config.toml");
            assert_eq!(locate(home), Some(home_config.clone()));
            assert_eq!(locate(xdg), Some(PathBuf::from("/xdg/ktb/config.toml")));
            assert_eq!(locate(relative), Some(home_config));
        }
    }

    #[test]
    fn every_key_is_its_flags_default_and_spelled_as_the_flag() {
        let values = [
            "team-a",
            "reg/agent:1",
            "Always",
            "3m",
            "45s",
            "direct",
            "socks5",
            "hosts",
            "5",
        ];
        let cli = Cli::command();
        let layer: Vec<Setting> = KEYS
            .iter()
            .zip(values)
            .map(|(key, value)| {
                check(&cli, key, value).expect("a valid value");
                let long = flag(&cli, key).get_long();
                assert!(long == Some(key.name) || key.name == "connect-mode");
                let value = value.to_owned();
                let source = Source::Config;
                Setting { key, value, source }
            })
            .collect();
        let mut configured = apply(cli, &layer);
        configured.build();
        configured.clone().debug_assert();
        for setting in &layer {
            let key = setting.key;
            let owners = match key.commands {
                [] => vec!["exchange"], // the global flag, as clap copied it
                names => names.to_vec(),
            };
            for name in owners {
                let command = configured.find_subcommand(name).expect("subcommand");
                let arg = command.get_arguments().find(|a| a.get_id() == key.arg);
                let defaults = arg.expect("flag").get_default_values();
                assert_eq!(defaults, [setting.value.as_str()], "{} in {name}", key.name);
            }
        }
    }

    #[test]
    fn values_are_checked_by_the_flags_own_parser() {
        let cli = Cli::command();
        let refused = |name: &str, value: &str| {
            let error = check(&cli, key(name).expect("a key"), value).expect_err(value);
            error.to_string()
        };
        assert!(refused("grace", "abc").contains("invalid duration \"abc\""));
        assert!(
            refused("transport", "tcp").contains("[possible values: port-forward, direct, auto]")
        );
        assert!(refused("dns-cache-ttl", "99999999").contains("not in 0..="));
        assert!(refused("namespace", "").contains("empty value"));
        assert!(check(&cli, key("namespace").expect("a key"), "-dash").is_ok());
        let unknown = key("graze").err().expect("unknown").to_string();
        assert!(unknown.contains("unknown key `graze`; the keys are namespace, agent-image"));
    }

    #[test]
    fn a_bad_file_is_refused_by_file_line_and_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let refused = |toml: &str| {
            let path = write_config(dir.path(), toml);
            let error = Contents::read(&path, &Cli::command())
                .err()
                .expect("refused");
            let text = error.to_string();
            assert!(
                text.starts_with(&format!("{}, line ", path.display())),
                "{text}"
            );
            text
        };
        let unknown = refused("grace = \"1m\"\n\n[context.staging]\ngraze = \"1m\"\n");
        assert!(unknown.contains("line 4: unknown key `graze`"), "{unknown}");
        let invalid = refused("grace = \"1m\"\n[context.x]\ngrace = \"soon\"\n");
        assert!(
            invalid.contains("line 3: grace: invalid value 'soon'"),
            "{invalid}"
        );
        let typed = refused("grace = [1]\n");
        assert!(typed.contains("line 1: grace is a TOML array"), "{typed}");
        let syntax = refused("grace = 1m\n");
        assert!(syntax.contains("line 1: not TOML"), "{syntax}");
        let profiles = refused("context = \"staging\"\n");
        assert!(profiles.contains("`context` is not a table"), "{profiles}");
    }

    #[test]
    fn a_missing_file_sets_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_kube, kubeconfig) = kube_dir();
        let missing = dir.path().join("none.toml");
        let contents = Contents::read(&missing, &Cli::command()).expect("no file, no settings");
        assert!(contents.global.is_empty() && contents.profiles.is_empty());
        assert_eq!(
            grace(parse(&missing, &kubeconfig, &["connect"])),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn set_and_unset_keep_the_rest_of_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("new").join("config.toml");
        let key = |name| super::key(name).expect("a key");
        set(&path, key("grace"), "45s", None).expect("set global");
        set(&path, key("dns-cache-ttl"), "5", None).expect("set a number");
        set(&path, key("namespace"), "team-a", Some("user@example")).expect("set profile");
        let text = std::fs::read_to_string(&path).expect("written");
        let with_comment = format!("# mine\n{text}");
        std::fs::write(&path, with_comment).expect("comment");
        set(&path, key("grace"), "50s", None).expect("overwrite");
        let contents = Contents::read(&path, &Cli::command()).expect("reads back");
        assert_eq!(lookup(&contents.global, key("grace")), Some("50s"));
        let profile = &contents.profiles["user@example"];
        assert_eq!(lookup(profile, key("namespace")), Some("team-a"));
        let text = std::fs::read_to_string(&path).expect("written");
        assert!(
            text.starts_with("# mine\ngrace = \"50s\"\ndns-cache-ttl = 5\n"),
            "{text}"
        );
        assert!(
            text.contains("[context.\"user@example\"]\nnamespace = \"team-a\""),
            "{text}"
        );

        assert!(unset(&path, key("namespace"), Some("user@example")).expect("unset"));
        assert!(!unset(&path, key("namespace"), Some("user@example")).expect("gone"));
        assert!(unset(&path, key("dns-cache-ttl"), None).expect("unset"));
        let text = std::fs::read_to_string(&path).expect("written");
        assert_eq!(text, "# mine\ngrace = \"50s\"\n");
    }

    #[test]
    fn the_profile_is_the_kubeconfig_contexts() {
        let (dir, kubeconfig) = kube_dir();
        let config = write_config(
            dir.path(),
            "grace = \"45s\"\n[context.staging]\ngrace = \"60s\"\nnamespace = \"team-a\"\n",
        );
        let load = |words: &[&str]| {
            let mut argv = args(&["ktb", "--kubeconfig"]);
            argv.push(kubeconfig.clone().into());
            argv.extend(args(words));
            Config::load(Some(config.clone()), &Cli::command(), &argv).expect("loads")
        };
        let current = load(&["connect"]);
        assert_eq!(current.context_in_use(), Some("staging"));
        let named = load(&["connect", "--context", "prod", "--help"]);
        assert_eq!(named.context_in_use(), Some("prod"));
        let effective = named.effective(&Cli::command()).expect("effective");
        let sources: Vec<String> = effective.iter().map(|e| e.source.to_string()).collect();
        assert_eq!(
            sources[..5],
            ["default", "default", "default", "default", "config"]
        );
        let effective = current.effective(&Cli::command()).expect("effective");
        assert_eq!(effective[0].value, "team-a");
        assert_eq!(effective[4].source, Source::Context("staging".into()));
    }

    #[test]
    fn a_flag_beats_the_profile_which_beats_the_file_which_beats_the_default() {
        let (dir, kubeconfig) = kube_dir();
        let config = write_config(
            dir.path(),
            "grace = \"45s\"\n[context.staging]\ngrace = \"60s\"\nnamespace = \"team-a\"\n",
        );
        let staging = parse(&config, &kubeconfig, &["connect"]);
        assert_eq!(staging.kube.namespace.as_deref(), Some("team-a"));
        assert_eq!(grace(staging), Duration::from_secs(60));
        let prod = parse(&config, &kubeconfig, &["--context", "prod", "connect"]);
        assert_eq!(
            prod.kube.namespace, None,
            "the kubeconfig's namespace still applies"
        );
        assert_eq!(grace(prod), Duration::from_secs(45));
        let flags = parse(
            &config,
            &kubeconfig,
            &["connect", "--grace", "5s", "-n", "mine"],
        );
        assert_eq!(flags.kube.namespace.as_deref(), Some("mine"));
        assert_eq!(grace(flags), Duration::from_secs(5));
    }

    #[test]
    fn an_environment_variable_beats_the_file() {
        const VAR: &str = "KTB_TEST_CONFIG_ENV_BEATS_FILE";
        static KEY: Key = Key {
            name: "image",
            arg: "image",
            commands: &[],
            integer: false,
        };
        let layer = [Setting {
            key: &KEY,
            value: "from-file".into(),
            source: Source::Config,
        }];
        // After the variable changes: clap reads it when the flag is defined.
        let value = |argv: &[&str]| {
            let cli = Command::new("t").arg(Arg::new("image").long("image").env(VAR));
            let matches = apply(cli, &layer).get_matches_from(argv);
            matches.get_one::<String>("image").cloned()
        };
        assert_eq!(value(&["t"]).as_deref(), Some("from-file"));
        std::env::set_var(VAR, "from-env");
        assert_eq!(value(&["t"]).as_deref(), Some("from-env"));
        assert_eq!(value(&["t", "--image", "flag"]).as_deref(), Some("flag"));
        std::env::remove_var(VAR);
    }

    #[test]
    fn kube_flags_are_found_in_a_command_line_that_is_not_done() {
        let cli = Cli::command();
        let found = |words: &[&str]| kube_flags(&cli, &args(words));
        let context = |name: &str| (None, Some(name.to_owned()));
        assert_eq!(
            found(&["ktb", "--context", "a", "exchange", "--help"]),
            context("a")
        );
        assert_eq!(
            found(&["ktb", "exchange", "svc", "--context=b"]),
            context("b")
        );
        assert_eq!(found(&["ktb", "exchange", "--context", "c"]), context("c"));
        let kubeconfig = found(&["ktb", "--kubeconfig", "/k", "status"]);
        assert_eq!(kubeconfig, (Some(PathBuf::from("/k")), None));
    }

    #[test]
    fn a_bad_file_stops_every_command() {
        let (dir, kubeconfig) = kube_dir();
        let config = write_config(dir.path(), "grace = \"later\"\n");
        let mut argv = args(&["ktb", "--kubeconfig"]);
        argv.push(kubeconfig.into());
        argv.extend(args(&["config", "path"]));
        let error = parse_cli(&argv, Some(config.clone()))
            .err()
            .expect("refused");
        assert!(
            error.downcast_ref::<clap::Error>().is_none(),
            "not a flag error"
        );
        assert!(error.to_string().starts_with(&config.display().to_string()));
    }
}
