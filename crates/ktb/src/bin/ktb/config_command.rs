//! `ktb config`: see and change the config file from the command line, so
//! that nobody has to learn its layout to set a default (kt-connect's
//! `ktctl config`). What the file means is [`crate::config`]'s; this is
//! the verbs, and what they print.

use anyhow::Context as _;
use clap::Subcommand;

use crate::config::{self, Config, Effective};
use crate::Output;

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Every key's value for the kubeconfig context in use (pick another
    /// with --context), and where it comes from.
    Show {
        /// `table` for people, `json` for scripts.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print one key's value for the kubeconfig context in use.
    Get {
        /// The key, as `ktb config show` lists them.
        key: String,
    },
    /// Set a key, the default of its flag: for every kubeconfig context,
    /// or for one.
    Set {
        /// The key, as `ktb config show` lists them.
        key: String,
        /// Its value, as the flag takes it.
        value: String,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a key: for every kubeconfig context, or from one's profile.
    Unset {
        /// The key, as `ktb config show` lists them.
        key: String,
        #[command(flatten)]
        target: Target,
    },
    /// Print where the config file is ($KTB_CONFIG, else the platform's
    /// config directory).
    Path,
}

/// Which part of the file `set` and `unset` change: the top-level keys,
/// unless one of these names a profile.
#[derive(clap::Args)]
pub struct Target {
    /// The profile of this kubeconfig context.
    #[arg(long, value_name = "CONTEXT")]
    for_context: Option<String>,
    /// The profile of the kubeconfig context in use (--context, else the
    /// kubeconfig's current-context).
    #[arg(long, conflicts_with = "for_context")]
    current_context: bool,
}

impl Target {
    /// The profile's context name; `None` for the top-level keys.
    fn context(self, config: &Config) -> anyhow::Result<Option<String>> {
        if !self.current_context {
            return Ok(self.for_context);
        }
        match config.context_in_use() {
            Some(name) => Ok(Some(name.to_owned())),
            None => anyhow::bail!(
                "no kubeconfig context in use (no --context, and no readable kubeconfig with a current-context); name one with --for-context"
            ),
        }
    }
}

/// Runs `command`; `cli` is the whole command line's definition, whose
/// flags check values and give the built-in defaults.
pub fn run(command: ConfigCommand, config: &Config, cli: &clap::Command) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Show { output } => show(config, cli, output),
        ConfigCommand::Get { key } => {
            let key = config::key(&key)?;
            let effective = config.effective(cli)?;
            let value = effective.iter().find(|e| e.key.name == key.name);
            println!("{}", value.expect("every key has a value").value);
            Ok(())
        }
        ConfigCommand::Set { key, value, target } => {
            let key = config::key(&key)?;
            config::check(cli, key, &value).with_context(|| format!("cannot set {}", key.name))?;
            let context = target.context(config)?;
            let path = config.path()?;
            config::set(path, key, &value, context.as_deref())?;
            println!(
                "set {} = {value}{} in {}",
                key.name,
                scope(&context),
                path.display()
            );
            Ok(())
        }
        ConfigCommand::Unset { key, target } => {
            let key = config::key(&key)?;
            let context = target.context(config)?;
            let path = config.path()?;
            let what = format!("{}{}", key.name, scope(&context));
            match config::unset(path, key, context.as_deref())? {
                true => println!("removed {what} from {}", path.display()),
                false => println!("{what} was not set in {}; nothing changed", path.display()),
            }
            Ok(())
        }
        ConfigCommand::Path => {
            println!("{}", config.path()?.display());
            Ok(())
        }
    }
}

/// ` for context NAME`, or nothing for a top-level key.
fn scope(context: &Option<String>) -> String {
    context
        .as_ref()
        .map(|name| format!(" for context {name}"))
        .unwrap_or_default()
}

fn show(config: &Config, cli: &clap::Command, output: Output) -> anyhow::Result<()> {
    let effective = config.effective(cli)?;
    let path = config.path().ok();
    let context = config.context_in_use();
    match output {
        Output::Json => {
            let keys: Vec<serde_json::Value> = effective.iter().map(json_row).collect();
            let json = serde_json::json!({ "file": path, "context": context, "keys": keys });
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        Output::Table => {
            let file = match path {
                Some(path) if path.exists() => path.display().to_string(),
                Some(path) => format!("{} (not written yet)", path.display()),
                None => "none (set KTB_CONFIG, or HOME)".to_owned(),
            };
            println!("file: {file}");
            println!("kubeconfig context: {}", context.unwrap_or("none"));
            println!();
            let rows: Vec<Vec<String>> = effective
                .iter()
                .map(|e| vec![e.key.name.to_owned(), e.value.clone(), e.source.to_string()])
                .collect();
            crate::print_table(&["KEY", "VALUE", "SOURCE"], &rows);
        }
    }
    Ok(())
}

fn json_row(effective: &Effective) -> serde_json::Value {
    serde_json::json!({
        "key": effective.key.name,
        "value": effective.value,
        "source": effective.source.to_string(),
    })
}
