//! `seactl generate completions|man --out DIR` (hidden): the shell completions and
//! man pages the Debian package ships (`.ci/deb` runs it before `cargo deb`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap_complete::Shell;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// Shell completions: seactl.bash, _seactl (zsh) and seactl.fish.
    Completions {
        /// The directory to write them in (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Man pages: seactl.1, and seactl-COMMAND.1 for each command.
    Man {
        /// The directory to write them in (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn generate(args: GenerateArgs, mut cmd: clap::Command) -> Result<ExitCode> {
    let out = match &args.what {
        What::Completions { out } | What::Man { out } => out,
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    match args.what {
        What::Completions { .. } => {
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                let path = clap_complete::generate_to(shell, &mut cmd, "seactl", out)
                    .with_context(|| format!("writing {shell} completions"))?;
                println!("{}", path.display());
            }
        }
        What::Man { .. } => {
            cmd.build();
            write_man(&cmd, "seactl", out)?;
            for sub in cmd
                .get_subcommands()
                .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            {
                let name = format!("seactl-{}", sub.get_name());
                let sub = sub
                    .clone()
                    .bin_name(format!("seactl {}", sub.get_name()))
                    .display_name(name.clone());
                write_man(&sub, &name, out)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_man(cmd: &clap::Command, name: &str, out: &Path) -> Result<()> {
    let path = out.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .title(name)
        .render(&mut page)
        .with_context(|| format!("rendering {name}.1"))?;
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    println!("{}", path.display());
    Ok(())
}
