//! The command line of the harness's experiment and benchmark binaries.

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{Result, anyhow, bail};

/// Runs `body`; its error is printed as `name: error` (with its causes) and exits 1.
pub fn run_main(name: &str, body: impl FnOnce() -> Result<()>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The process's arguments, read as flags, some taking the next argument as value.
pub struct Flags(std::iter::Skip<std::env::Args>);

impl Flags {
    /// The arguments after the program's name.
    pub fn from_env() -> Flags {
        Flags(std::env::args().skip(1))
    }

    /// The next flag, `None` at the end.
    pub fn next_flag(&mut self) -> Option<String> {
        self.0.next()
    }

    /// The value of `flag`: the next argument (`FLAG needs a value` when none).
    pub fn value(&mut self, flag: &str) -> Result<String> {
        self.0.next().ok_or_else(|| anyhow!("{flag} needs a value"))
    }

    /// The value of `flag`, parsed.
    pub fn parse<T>(&mut self, flag: &str) -> Result<T>
    where
        T: FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        Ok(self.value(flag)?.parse()?)
    }
}

/// The flags of a binary taking a number, `FLAG N`, and `--out FILE`: `number` and
/// `out` unless given; anything else is an error `usage: USAGE`.
pub fn number_and_out<T>(flag: &str, number: T, out: PathBuf, usage: &str) -> Result<(T, PathBuf)>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let (mut number, mut out) = (number, out);
    let mut flags = Flags::from_env();
    while let Some(a) = flags.next_flag() {
        match a.as_str() {
            f if f == flag => number = flags.parse(&a)?,
            "--out" => out = PathBuf::from(flags.value(&a)?),
            _ => bail!("usage: {usage}"),
        }
    }
    Ok((number, out))
}
