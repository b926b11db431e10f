//! Commands that need no control plane: they read files and print.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use shardmap::{Change, Plan, Router, ShardMap};

/// Reads a file, or stdin for `-`.
pub fn read(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
        return Ok(s);
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Reads and validates a map; every problem is in the error.
pub fn load_map(path: &Path) -> Result<ShardMap> {
    ShardMap::from_json(&read(path)?)
        .map_err(|p| anyhow::anyhow!("{} is not a valid shard map:\n{p}", path.display()))
}

pub fn validate(path: &Path) -> Result<ExitCode> {
    match ShardMap::from_json(&read(path)?) {
        Ok(map) => {
            println!(
                "{}: valid ({} servers, {} slot ranges, {} pins, {} path rules)",
                path.display(),
                map.servers().len(),
                map.slots.len(),
                map.pins.len(),
                map.paths.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(problems) => {
            eprintln!("{}: {} problem(s)", path.display(), problems.len());
            for p in &problems {
                eprintln!("  {p}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

pub fn route(path: &Path, json: bool, uris: Vec<String>) -> Result<ExitCode> {
    let map = load_map(path)?;
    let router = Router::new(&map).map_err(|p| anyhow::anyhow!("{p}"))?;
    let mut out = std::io::stdout().lock();
    let mut one = |uri: &str| -> Result<()> {
        let d = router.decide(uri);
        if json {
            let line = RouteLine {
                uri,
                base_uuid: d.base.map(|b| b.to_string()),
                server: d.server,
                reason: d.reason.as_str(),
            };
            writeln!(out, "{}", serde_json::to_string(&line)?)?;
        } else {
            let base = d.base.map(|b| b.dashed()).unwrap_or_else(|| "-".into());
            writeln!(
                out,
                "{:<20} {:<8} {:<36} {uri}",
                d.server,
                d.reason.as_str(),
                base
            )?;
        }
        Ok(())
    };
    if uris.is_empty() {
        for line in std::io::stdin().lock().lines() {
            let line = line.context("reading stdin")?;
            let uri = line.trim();
            if !uri.is_empty() {
                one(uri)?;
            }
        }
    } else {
        for uri in &uris {
            one(uri)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line of `seactl route --json`.
#[derive(serde::Serialize)]
struct RouteLine<'a> {
    uri: &'a str,
    base_uuid: Option<String>,
    server: &'a str,
    reason: &'a str,
}

pub fn diff(old: &Path, new: &Path, json: bool) -> Result<ExitCode> {
    let plan =
        shardmap::diff(&load_map(old)?, &load_map(new)?).map_err(|p| anyhow::anyhow!("{p}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", describe_plan(&plan));
    }
    Ok(ExitCode::SUCCESS)
}

/// The plan, for a person.
pub fn describe_plan(plan: &Plan) -> String {
    let mut s = String::new();
    if plan.is_empty() {
        s.push_str("no change\n");
        return s;
    }
    if !plan.slots.is_empty() {
        s.push_str("slots moving:\n");
        for m in &plan.slots {
            s.push_str(&format!("  {:<12} {} -> {}\n", m.range, m.from, m.to));
        }
    }
    if !plan.pins.is_empty() {
        s.push_str("pins changing:\n");
        for p in &plan.pins {
            let side = |o: &Option<String>| o.clone().unwrap_or_else(|| "(slot)".into());
            s.push_str(&format!(
                "  {:<32} {} -> {}\n",
                p.pin,
                side(&p.before),
                side(&p.after)
            ));
        }
    }
    if plan.moves_bases() {
        s.push_str("bases move:\n");
        for m in &plan.moves {
            s.push_str(&format!("  {} -> {}\n", m.from, m.to));
        }
        s.push_str(&format!(
            "fence during the rollout: slots [{}] pins [{}]\n",
            plan.fence.slots.join(", "),
            plan.fence.pins.join(", ")
        ));
        s.push_str(&format!(
            "servers that may hold a moved base: {}\n",
            plan.losing.join(", ")
        ));
    } else {
        s.push_str("no base moves\n");
    }
    if plan.default_changed {
        s.push_str("the default server changes (uuid-less requests)\n");
    }
    if plan.paths_changed {
        s.push_str("path rules change (uuid-less requests)\n");
    }
    for a in &plan.servers_added {
        s.push_str(&format!("new server: {a}\n"));
    }
    for r in &plan.servers_removed {
        s.push_str(&format!("server no longer used: {r}\n"));
    }
    s
}

pub fn import_nginx(conf: &Path, servers: &[String]) -> Result<ExitCode> {
    let mut names = BTreeMap::new();
    for s in servers {
        let Some((upstream, name)) = s.split_once('=') else {
            bail!("--server takes UPSTREAM=NAME, got `{s}`")
        };
        names.insert(upstream.to_owned(), name.to_owned());
    }
    match shardmap::nginx::import(&read(conf)?, &names) {
        Ok(import) => {
            for w in &import.warnings {
                eprintln!("warning: {w}");
            }
            println!("{}", import.map.to_json_pretty());
            Ok(ExitCode::SUCCESS)
        }
        Err(problems) => {
            eprintln!("{}: cannot import:", conf.display());
            for p in &problems {
                eprintln!("  {p}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

pub fn rebalance(
    path: &Path,
    add: Option<String>,
    remove: Option<String>,
    digits: Option<u32>,
) -> Result<ExitCode> {
    let map = load_map(path)?;
    let change = match (add, remove) {
        (Some(a), None) => Change::Add(a),
        (None, Some(r)) => Change::Remove(r),
        _ => bail!("give exactly one of --add or --remove"),
    };
    let r = shardmap::rebalance(&map, &change, digits)?;
    eprintln!(
        "{} of {} slots ({}-digit) move",
        r.moved_slots,
        1usize << (4 * r.digits),
        r.digits
    );
    println!("{}", r.map.to_json_pretty());
    Ok(ExitCode::SUCCESS)
}

/// The sample map of the demo: SeaTable's documented split, a pin and a path rule.
pub const SAMPLE_MAP: &str = r#"{
  "default": "dtable-server",
  "slots": { "0-9": "dtable-server-2", "a-f": "dtable-server" },
  "pins": { "ff84e1a1-66e2": "dtable-server-2" },
  "paths": [ { "prefix": "/api/v1/admin/", "server": "dtable-server" } ]
}"#;

/// Sample SeaTable requests: every shape that carries a base, and some that do not.
pub const SAMPLE_URIS: &[&str] = &[
    "/ping/",
    "/api/v1/admin/sys-info/",
    "/dtable-server/api/v1/dtables/a1b2c3d4-5e6f-4a0b-8c9d-0e1f2a3b4c5d/rows/?table_name=Table1",
    "/api/v1/dtables/0f1e2d3c-4b5a-4968-8776-655443322110/",
    "/api/v1/internal/dtables/0f1e2d3c4b5a49688776655443322110/operations/",
    "/api-gateway/api/v2/dtables/A1B2C3D4-5E6F-4A0B-8C9D-0E1F2A3B4C5D/rows/",
    "/dtable-db/api/v1/query/ff84e1a1-66e2-4d2c-9b3a-112233445566/",
    "/socket.io/?dtable_uuid=ff84e1a1-66e2-4d2c-9b3a-112233445566&EIO=4&transport=websocket",
    "/socket.io/?EIO=4&transport=polling&dtable_uuid=0f1e2d3c4b5a49688776655443322110",
];

pub fn demo() -> Result<ExitCode> {
    let map = ShardMap::from_json(SAMPLE_MAP).map_err(|p| anyhow::anyhow!("{p}"))?;
    let router = Router::new(&map).map_err(|p| anyhow::anyhow!("{p}"))?;
    println!("sample shard map:\n{SAMPLE_MAP}\n");
    println!(
        "{:<20} {:<8} {:<36} request",
        "server", "reason", "base_uuid"
    );
    for uri in SAMPLE_URIS {
        let d = router.decide(uri);
        let base = d.base.map(|b| b.dashed()).unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:<8} {:<36} {uri}",
            d.server,
            d.reason.as_str(),
            base
        );
    }
    Ok(ExitCode::SUCCESS)
}
