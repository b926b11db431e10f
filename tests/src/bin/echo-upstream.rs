//! `echo-upstream --name NAME --listen 127.0.0.1:PORT`: a fake dtable-server
//! that answers every request with what it received (see
//! `seashard_tests::echo`). Prints `ready ADDR` on stdout once listening
//! (`ADDR` is the bound address, useful with port 0).

use std::io::Write;
use std::net::TcpListener;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut name = None;
    let mut listen = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--name" => name = args.next(),
            "--listen" => listen = args.next(),
            "-h" | "--help" => {
                println!("usage: echo-upstream --name NAME --listen 127.0.0.1:PORT");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("echo-upstream: unknown argument {other:?} (see --help)");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(name), Some(listen)) = (name, listen) else {
        eprintln!("usage: echo-upstream --name NAME --listen 127.0.0.1:PORT");
        return ExitCode::from(2);
    };
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("echo-upstream {name}: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener
        .local_addr()
        .expect("local_addr of a bound listener");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready {addr}");
    let _ = out.flush();
    drop(out);
    match seashard_tests::echo::serve(&name, listener) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("echo-upstream {name}: {e}");
            ExitCode::FAILURE
        }
    }
}
