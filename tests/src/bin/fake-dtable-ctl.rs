//! The restart hook of a `fake-dtable-server`, as a control plane calls it
//! (an argv):
//!
//! ```text
//! fake-dtable-ctl restart --pid-file FILE [--timeout-ms 30000] [--output FILE] \
//!     -- fake-dtable-server --name ... --pid-file FILE ...
//! fake-dtable-ctl stop --pid-file FILE [--timeout-ms 30000]
//! ```
//!
//! `stop` sends SIGTERM to the pid in FILE and waits until that process has
//! exited (it saves every modified base first); `restart` then runs the start
//! command detached (its own process group, stdout/stderr appended to
//! `--output`, default /dev/null) and waits until the pid file names the new
//! process. Exit 0 on success, 1 on a timeout or error (the old server is
//! never killed: a kill would lose its unsaved writes), 2 on bad usage.

use std::process::ExitCode;
use std::time::Duration;

use seashard_tests::dtable;

const USAGE: &str = "usage: fake-dtable-ctl restart --pid-file FILE [--timeout-ms N] \
    [--output FILE] -- START-COMMAND...\n       fake-dtable-ctl stop --pid-file FILE [--timeout-ms N]";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let (mut pid_file, mut timeout, mut output, mut start) =
        (None, Duration::from_secs(30), None, Vec::new());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--pid-file" => pid_file = args.next(),
            "--output" => output = args.next(),
            "--timeout-ms" => match args.next().and_then(|v| v.parse().ok()) {
                Some(ms) => timeout = Duration::from_millis(ms),
                None => {
                    eprintln!("--timeout-ms needs a number\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--" => {
                start = args.by_ref().collect();
                break;
            }
            other => {
                eprintln!("fake-dtable-ctl: unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let Some(pid_file) = pid_file.map(std::path::PathBuf::from) else {
        eprintln!("--pid-file is required\n{USAGE}");
        return ExitCode::from(2);
    };
    let res = match cmd.as_str() {
        "stop" => dtable::stop_by_pid_file(&pid_file, timeout).map(|_| ()),
        "restart" if !start.is_empty() => {
            dtable::restart_by_pid_file(&pid_file, &start, output.as_deref(), timeout)
                .map(|pid| println!("restarted: pid {pid}"))
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-dtable-ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
