//! `fake-dtable-server --name NAME --listen 127.0.0.1:PORT --storage DIR
//! --save-interval-ms N --log FILE [--pid-file FILE]`: a model of SeaTable's
//! dtable-server for the lost-write experiment (see
//! `seashard_tests::dtable_server`). Prints `ready ADDR` once listening;
//! SIGTERM saves every modified base and exits 0.

use std::io::Write;
use std::process::ExitCode;

use seashard_tests::dtable_server::{ServerArgs, run};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{}", ServerArgs::USAGE);
        return ExitCode::SUCCESS;
    }
    let args = match ServerArgs::parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fake-dtable-server: {e:#}");
            return ExitCode::from(2);
        }
    };
    let name = args.name.clone();
    let res = run(args, |addr| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "ready {addr}");
        let _ = out.flush();
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-dtable-server {name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
