//! Throughput and peak memory of `seactl audit-nginx`'s reader: streams a generated
//! access log (SeaTable's documented config, many bases, every URL shape) through
//! [`nginx_audit::feed`] and prints lines/s, MB/s and the peak RSS (VmHWM).
//!
//! `cargo run --release -p nginx-audit --bin audit-nginx-bench -- [--bytes N[M|G]]
//! [--bases N] [--predict]`: default 200M of log, 20000 bases, `$upstream_addr` on
//! every line (`--predict`: none, so every line goes through nginx's map regexes).
//! The log is generated on the fly (never held whole): `--bytes 1G` runs the 1 GB case.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::ExitCode;
use std::time::Instant;

/// SeaTable's documented `map $request_uri` (`../seatable-map.conf`, shared with the
/// tests) behind two upstreams.
const CONF: &str = concat!(
    "\nhttp {\n",
    "    upstream dtable_server_a_z { server 10.0.0.4:5000; keepalive 15; }\n",
    "    upstream dtable_server_0_9 { server 10.0.0.5:5000; keepalive 15; }\n",
    include_str!("../seatable-map.conf"),
    "}\n",
);

/// A log of `limit` bytes, made line by line.
struct Generated {
    limit: u64,
    produced: u64,
    bases: u64,
    predict: bool,
    x: u64,
    n: u64,
    line: Vec<u8>,
    pos: usize,
}

impl Generated {
    fn next_line(&mut self) {
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        self.n += 1;
        let b = (self.x >> 20) % self.bases;
        // The base's uuid: a hash of its number.
        let h = b.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x1234_5678_9abc_def0;
        let base = shardmap::BaseUuid::from_u128(
            (u128::from(h) << 64) | u128::from(h.rotate_left(17) ^ b),
        );
        let (hex, dashed) = (base.as_str(), base.dashed());
        let (target, upstream) = match (self.x >> 44) % 10 {
            0 | 1 => (
                format!("/api/v1/internal/dtables/{hex}/operations/"),
                "10.0.0.4:5000",
            ),
            2 => (
                format!("/socket.io/?dtable_uuid={dashed}&EIO=4&transport=websocket"),
                if hex.as_bytes()[0].is_ascii_digit() {
                    "10.0.0.5:5000"
                } else {
                    "10.0.0.4:5000"
                },
            ),
            3 => ("/ping/".to_string(), "10.0.0.4:5000"),
            _ => (
                format!("/dtable-server/api/v1/dtables/{dashed}/rows/?table_name=Table1"),
                if hex.as_bytes()[0].is_ascii_digit() {
                    "10.0.0.5:5000"
                } else {
                    "10.0.0.4:5000"
                },
            ),
        };
        let tail = if self.predict {
            String::new()
        } else {
            format!(" \"{upstream}\"")
        };
        let (m, s) = ((self.n / 60) % 60, self.n % 60);
        self.line = format!(
            "10.0.{}.{} - - [01/Dec/2026:10:{m:02}:{s:02} +0000] \"GET {target} HTTP/1.1\" 200 {} \"https://cloud.example.com/dtable/\" \"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36\"{tail}\n",
            self.x % 256,
            (self.x >> 8) % 256,
            self.x % 5000
        )
        .into_bytes();
        self.pos = 0;
    }
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut written = 0;
        while written < buf.len() && self.produced < self.limit {
            if self.pos == self.line.len() {
                self.next_line();
            }
            let n = (self.line.len() - self.pos)
                .min(buf.len() - written)
                .min(usize::try_from(self.limit - self.produced).unwrap_or(usize::MAX));
            buf[written..written + n].copy_from_slice(&self.line[self.pos..self.pos + n]);
            self.pos += n;
            written += n;
            self.produced += n as u64;
        }
        Ok(written)
    }
}

fn vm_hwm_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn size(s: &str) -> Option<u64> {
    let (num, mul) = match s.as_bytes().last()? {
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mul)
}

fn main() -> ExitCode {
    let mut bytes = 200u64 << 20;
    let mut bases = 20_000u64;
    let mut predict = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().as_deref().map(str::to_owned)) {
            ("--bytes", Some(v)) if size(&v).is_some() => bytes = size(&v).unwrap_or(bytes),
            ("--bases", Some(v)) if v.parse::<u64>().is_ok_and(|n| n > 0) => {
                bases = v.parse().unwrap_or(bases)
            }
            ("--predict", None) => predict = true,
            _ => {
                eprintln!("usage: audit-nginx-bench [--bytes N[K|M|G]] [--bases N] [--predict]");
                return ExitCode::from(2);
            }
        }
    }
    let imported = match shardmap::nginx::import(CONF, &BTreeMap::new()) {
        Ok(i) => i.map,
        Err(p) => {
            eprintln!("{p}");
            return ExitCode::FAILURE;
        }
    };
    let nginx = match shardmap::nginx::nginx_map(CONF, &BTreeMap::new()) {
        Ok(m) => m,
        Err(p) => {
            eprintln!("{p}");
            return ExitCode::FAILURE;
        }
    };
    let mut audit = match nginx_audit::Audit::new(&imported, &nginx, |_, _| Vec::new(), &[]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let hwm_before = vm_hwm_kib().unwrap_or(0);
    let log = Generated {
        limit: bytes,
        produced: 0,
        bases,
        predict,
        x: 0x9e37_79b9_7f4a_7c15,
        n: 0,
        line: Vec::new(),
        pos: 0,
    };
    let start = Instant::now();
    if let Err(e) = nginx_audit::feed(&mut audit, log) {
        eprintln!("{e}");
        return ExitCode::FAILURE;
    }
    let secs = start.elapsed().as_secs_f64();
    let r = audit.report();
    let hwm = vm_hwm_kib().unwrap_or(0);
    println!(
        "{} MiB, {} lines ({}), {} bases ({} at risk), {} malformed: {:.2} s, {:.0} MiB/s, {:.0} k lines/s; peak RSS (VmHWM) {} KiB (before reading: {} KiB)",
        bytes >> 20,
        r.lines,
        if predict {
            "predicted from the map"
        } else {
            "with $upstream_addr"
        },
        r.bases,
        r.bases_at_risk,
        r.malformed_total,
        secs,
        bytes as f64 / f64::from(1 << 20) / secs,
        r.lines as f64 / secs / 1000.0,
        hwm,
        hwm_before
    );
    ExitCode::SUCCESS
}
