//! The control plane's HTTP API, from the command line: a small blocking client and
//! the commands built on it (`push-map`, `status`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

/// Where the control plane is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// The control plane's HTTP API.
    #[arg(long, env = "SEASHARD_URL", default_value = "http://127.0.0.1:18080")]
    pub url: String,
    /// The API token: the change token, or the read-only token for reads.
    #[arg(long, env = "SEASHARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// For an https:// URL: the CA (PEM) that signed the control plane's certificate
    /// (`seactl certs init` makes one). Without it, the webpki (Mozilla) roots.
    #[arg(long, env = "SEASHARD_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

/// How `remote` is reached over TLS: its CA alone when given, else the webpki
/// (Mozilla) roots. The CA is for https:// URLs only; with http:// it is not used.
fn tls_config(remote: &Remote) -> Result<ureq::tls::TlsConfig> {
    let builder = ureq::tls::TlsConfig::builder();
    let Some(ca) = &remote.ca else {
        return Ok(builder.build());
    };
    if !remote.url.starts_with("https://") {
        eprintln!(
            "seactl: note: --ca/SEASHARD_CA {} is not used: {} is not an https:// URL \
             (the token and everything else travel in clear)",
            ca.display(),
            remote.url
        );
        return Ok(builder.build());
    }
    let pem = std::fs::read(ca).with_context(|| format!("reading the CA {}", ca.display()))?;
    let certs = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("the CA {} is not PEM", ca.display()))?;
    if certs.is_empty() {
        bail!("the CA {} holds no PEM certificate", ca.display());
    }
    Ok(builder
        .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
        .build())
}

/// A hint for an error talking to the API over the wrong protocol or with a
/// certificate that is not trusted.
pub fn tls_hint(e: &anyhow::Error) -> Option<&'static str> {
    let is_rustls =
        |e: &(dyn std::error::Error + 'static)| e.downcast_ref::<rustls::Error>().is_some();
    e.chain()
        .find_map(|c| match c.downcast_ref::<ureq::Error>()? {
            ureq::Error::Rustls(_) | ureq::Error::Tls(_) => Some(UNTRUSTED),
            ureq::Error::Io(io) if io.get_ref().is_some_and(|inner| is_rustls(inner)) => {
                Some(UNTRUSTED)
            }
            ureq::Error::Protocol(_) => Some(
                "the answer is not HTTP: if the control plane serves HTTPS ([api.tls]), use an \
             https:// URL",
            ),
            _ => None,
        })
}

const UNTRUSTED: &str = "TLS: the control plane's certificate was not accepted; pass --ca FILE \
     (or set SEASHARD_CA) with the CA that signed it, and reach it by a name or address the \
     certificate holds (`seactl certs server --san`)";

/// How to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// An API answer: status and JSON body.
struct Answer {
    status: u16,
    body: Value,
}

/// A blocking client of the API.
struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    fn new(remote: &Remote) -> Result<Client> {
        Ok(Client {
            base: remote.url.trim_end_matches('/').to_owned(),
            token: remote.token.clone(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .tls_config(tls_config(remote)?)
                .build()
                .into(),
        })
    }

    fn get(&self, path: &str) -> Result<Answer> {
        let url = format!("{}{path}", self.base);
        let mut req = self.agent.get(&url);
        if let Some(t) = &self.token {
            req = req.header("authorization", &format!("Bearer {t}"));
        }
        let resp = req.call().with_context(|| format!("GET {url}"))?;
        answer(resp, &url)
    }

    fn post(&self, path: &str, body: &Value) -> Result<Answer> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .agent
            .post(&url)
            .header("content-type", "application/json")
            .header("x-seashard-author", &author());
        if let Some(t) = &self.token {
            req = req.header("authorization", &format!("Bearer {t}"));
        }
        let resp = req
            .send(body.to_string())
            .with_context(|| format!("POST {url}"))?;
        answer(resp, &url)
    }
}

fn answer(mut resp: ureq::http::Response<ureq::Body>, url: &str) -> Result<Answer> {
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .with_context(|| format!("reading the answer of {url}"))?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Answer { status, body })
}

/// An error answer as text: the reason and every problem.
fn describe_error(a: &Answer) -> String {
    let mut s = format!(
        "{} ({})",
        a.body["error"].as_str().unwrap_or("error"),
        a.status
    );
    for p in a.body["problems"].as_array().into_iter().flatten() {
        let at = p["at"].as_str().unwrap_or_default();
        let msg = p["message"].as_str().unwrap_or_default();
        if at.is_empty() {
            s.push_str(&format!("\n  {msg}"));
        } else {
            s.push_str(&format!("\n  {at}: {msg}"));
        }
    }
    s
}

/// `seactl push-map`.
#[derive(Debug, clap::Args)]
pub struct PushMapArgs {
    /// The shard map (JSON); `-` for stdin.
    pub map: PathBuf,
    /// Show the plan only; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Apply without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Why (recorded in the history and audit log).
    #[arg(long, short = 'm', default_value = "")]
    pub comment: String,
    /// How long to wait for every Envoy's ACK, in seconds.
    #[arg(long, default_value_t = 30)]
    pub wait: u64,
    /// For a rollout: restart at most N servers at once [default: the control
    /// plane's `[rollout] max_parallel_restarts`].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub parallel: Option<u64>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub remote: Remote,
}

/// Shows the plan, asks, applies, and follows the Envoys' ACKs.
pub fn push_map(args: PushMapArgs) -> Result<ExitCode> {
    let text = crate::offline::read(&args.map)?;
    let map: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", args.map.display()))?;
    // Re-encoding would keep only the last of a repeated key: refuse it here.
    shardmap::check_unique_keys(&text).map_err(|e| anyhow!("{}: {e}", args.map.display()))?;
    let client = Client::new(&args.remote)?;
    let json_out = args.output == Output::Json;

    let plan = client.post("/v1/maps?dry_run=true", &json!({ "map": map }))?;
    if plan.status != 200 {
        return fail(json_out, &plan);
    }
    if !json_out {
        print_plan(&plan.body);
    }
    if args.dry_run {
        if json_out {
            println!("{}", pretty(&plan.body));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if plan.body["unchanged"] == true {
        if json_out {
            println!("{}", pretty(&plan.body));
        } else {
            println!("Nothing to do: the active map is already this one.");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let rollout = plan.body["needs_rollout"] == true;
    let question = if rollout {
        "Start the rollout (fence the moved bases, restart the servers above, activate)?"
    } else {
        "Apply this map?"
    };
    if !args.yes && !confirm(question)? {
        println!("Not applied.");
        return Ok(ExitCode::FAILURE);
    }
    let from = plan.body["from_version"].as_u64().unwrap_or(0);
    let applied = client.post(
        "/v1/maps",
        &json!({
            "map": map,
            "base_version": from,
            "comment": args.comment,
            "author": author(),
            "parallel": args.parallel,
        }),
    )?;
    if applied.status == 202 {
        let id = applied.body["rollout"].as_u64().unwrap_or(0);
        if !json_out {
            println!("Rollout {id} started.");
        }
        return follow(&client, id, json_out);
    }
    if applied.status != 200 {
        return fail(json_out, &applied);
    }
    let version = applied.body["version"].as_u64().unwrap_or(0);
    if !json_out {
        println!("Version {version} is active; waiting for every Envoy to apply it ...");
    }
    let (ok, status) = wait_acked(&client, Duration::from_secs(args.wait), json_out)?;
    if json_out {
        println!(
            "{}",
            pretty(&json!({ "outcome": applied.body, "acked": ok, "nodes": status["nodes"] }))
        );
    } else if ok {
        println!("Every connected Envoy runs version {version}.");
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Polls the nodes (not the status: that also checks every server's health) until
/// every connected node is current on the filter config, one NACKed it, or `timeout`.
/// Returns whether all are current, and the last answer.
fn wait_acked(client: &Client, timeout: Duration, quiet: bool) -> Result<(bool, Value)> {
    let start = Instant::now();
    let mut last_owing = Vec::new();
    loop {
        let s = client.get("/v1/nodes")?;
        if s.status != 200 {
            bail!("{}", describe_error(&s));
        }
        let nodes: Vec<&Value> = s.body["nodes"]
            .as_array()
            .map(|a| a.iter().filter(|n| n["connected"] == true).collect())
            .unwrap_or_default();
        let nacked: Vec<&Value> = nodes
            .iter()
            .copied()
            .filter(|n| n["state"]["ecds"] == "nacked")
            .collect();
        let owing: Vec<String> = nodes
            .iter()
            .filter(|n| n["state"]["ecds"] != "current" && n["state"]["ecds"] != "nacked")
            .filter_map(|n| n["instance"].as_str().map(str::to_owned))
            .collect();
        if !nacked.is_empty() {
            if !quiet {
                for n in &nacked {
                    eprintln!(
                        "NACK from {}: {}",
                        n["instance"].as_str().unwrap_or("?"),
                        n["types"]["ecds"]["nack_error"].as_str().unwrap_or("")
                    );
                }
            }
            return Ok((false, s.body));
        }
        if owing.is_empty() {
            if !quiet {
                println!(
                    "  {} Envoy(s) ACKed in {} ms",
                    nodes.len(),
                    start.elapsed().as_millis()
                );
            }
            return Ok((true, s.body));
        }
        if start.elapsed() >= timeout {
            if !quiet {
                eprintln!(
                    "Timed out after {}s; still owing an ACK: {}",
                    timeout.as_secs(),
                    owing.join(", ")
                );
            }
            return Ok((false, s.body));
        }
        if owing != last_owing && !quiet {
            println!("  waiting for: {}", owing.join(", "));
            last_owing = owing;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn print_plan(o: &Value) {
    let p = &o["plan"];
    println!("Active version: {}", o["from_version"]);
    if o["unchanged"] == true {
        println!("The map is the active one: no change.");
        return;
    }
    let list = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    for m in p["slots"].as_array().into_iter().flatten() {
        println!(
            "  slots {:<12} {} → {}",
            m["range"].as_str().unwrap_or(""),
            m["from"].as_str().unwrap_or(""),
            m["to"].as_str().unwrap_or("")
        );
    }
    for c in p["pins"].as_array().into_iter().flatten() {
        println!(
            "  pin   {:<12} {} → {}",
            c["pin"].as_str().unwrap_or(""),
            c["before"].as_str().unwrap_or("(its slot)"),
            c["after"].as_str().unwrap_or("(its slot)")
        );
    }
    if p["default_changed"] == true {
        println!("  the default server changes (requests without a base)");
    }
    if p["paths_changed"] == true {
        println!("  path rules change (requests without a base)");
    }
    for s in list(&p["servers_added"]) {
        println!("  new server: {s}");
    }
    for s in list(&p["servers_removed"]) {
        println!("  server no longer used: {s}");
    }
    if o["needs_rollout"] == true {
        println!(
            "Moves bases from {} to {}: a rollout (fence, restart, activate).",
            list(&p["losing"]).join(", "),
            list(&p["gaining"]).join(", ")
        );
        let restart = o["restart"].as_array().cloned().unwrap_or_default();
        if restart.is_empty() {
            println!("Servers to restart: none.");
        } else {
            println!("Servers to restart:");
        }
        for r in &restart {
            println!(
                "  {:<20} ({} hook) {}",
                r["server"].as_str().unwrap_or(""),
                r["hook"].as_str().unwrap_or(""),
                r["why"].as_str().unwrap_or("")
            );
        }
        for r in o["skipped"].as_array().into_iter().flatten() {
            println!(
                "  not restarted: {:<20} {}",
                r["server"].as_str().unwrap_or(""),
                r["why"].as_str().unwrap_or("")
            );
        }
    } else {
        println!("No base changes server.");
    }
}

fn fail(json_out: bool, a: &Answer) -> Result<ExitCode> {
    if json_out {
        println!("{}", pretty(&a.body));
    } else {
        eprintln!("{}", describe_error(a));
    }
    Ok(ExitCode::FAILURE)
}

fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("not asking on a non-interactive stdin: pass --yes to apply, or --dry-run");
    }
    print!("{question} [y/N] ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

/// Who is pushing: `$USER@host`, for the audit log.
fn author() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    if host.is_empty() {
        user
    } else {
        format!("{user}@{host}")
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// How long `follow` keeps polling a rollout, at most.
const FOLLOW_LIMIT: Duration = Duration::from_secs(24 * 3600);
/// How long `follow` waits for an unreachable control plane to come back.
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(120);

/// Follows rollout `id` until it ends: prints each step with the elapsed time, the
/// Envoys owing an ACK and the server restarting. Exit 0 only when `done`.
fn follow(client: &Client, id: u64, json_out: bool) -> Result<ExitCode> {
    let start = Instant::now();
    let mut last_line = String::new();
    let mut steps_shown = 0;
    let mut unreachable_since: Option<Instant> = None;
    let mut resumed_shown = 0;
    loop {
        // The control plane may be restarting: it resumes the rollout; keep following.
        let a = match client.get(&format!("/v1/rollouts/{id}")) {
            Ok(a) => {
                unreachable_since = None;
                a
            }
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(|| {
                    if !json_out {
                        eprintln!("  control plane unreachable ({e:#}); retrying ...");
                    }
                    Instant::now()
                });
                if since.elapsed() > UNREACHABLE_LIMIT {
                    return Err(e.context(format!(
                        "the control plane stayed unreachable for {UNREACHABLE_LIMIT:?}; \
                         `seactl rollout follow {id}` follows it again"
                    )));
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        if a.status != 200 {
            bail!("{}", describe_error(&a));
        }
        let r = &a.body;
        let state = r["state"].as_str().unwrap_or("?");
        if !json_out {
            // Every step as stored (a fast one may pass between two polls).
            let steps = r["steps"].as_array().cloned().unwrap_or_default();
            let created = r["created_at"].as_i64().unwrap_or(0);
            for st in steps.iter().skip(steps_shown) {
                println!(
                    "  step {:<12} at +{:.2}s{}",
                    st["step"].as_str().unwrap_or("?"),
                    (st["started_at"].as_i64().unwrap_or(created) - created) as f64 / 1000.0,
                    st["note"]
                        .as_str()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default()
                );
            }
            steps_shown = steps.len().max(steps_shown);
            let resumed = r["resumed"].as_u64().unwrap_or(0);
            if resumed > resumed_shown {
                println!(
                    "  [{:>7.2}s] resumed by a restarted control plane at step {state}",
                    start.elapsed().as_secs_f64()
                );
                resumed_shown = resumed;
            }
            let line = progress_line(r);
            if line != last_line && state != "done" {
                println!("  [{:>7.2}s] {line}", start.elapsed().as_secs_f64());
                last_line = line;
            }
        }
        if state == "done" || state == "rolled_back" {
            if json_out {
                println!("{}", pretty(r));
            } else {
                print_end(r);
            }
            return Ok(if state == "done" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        if start.elapsed() > FOLLOW_LIMIT {
            bail!("rollout {id} still runs after {FOLLOW_LIMIT:?}; stopped following");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One line of a rollout's progress.
fn progress_line(r: &Value) -> String {
    let state = r["state"].as_str().unwrap_or("?");
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let mut line = match state {
        "plan" => "plan".to_owned(),
        "fence" => match r["fence_version"].as_u64() {
            Some(v) => format!("fence: version {v} (the moved bases answer 503)"),
            None => "fence".to_owned(),
        },
        "restart" => "restart".to_owned(),
        "activate" => match r["new_version"].as_u64() {
            Some(v) => format!("activate: version {v}"),
            None => "activate".to_owned(),
        },
        "rolling_back" => format!("rolling back: {}", r["reason"].as_str().unwrap_or("")),
        other => other.to_owned(),
    };
    let owing = names(&r["owing_ack"]["pending"]);
    if !owing.is_empty() {
        line.push_str(&format!("; owing an ACK: {}", owing.join(", ")));
    }
    let restarting = names(&r["restarting_all"]);
    if !restarting.is_empty() {
        line.push_str(&format!("; restarting {}", restarting.join(", ")));
    } else if let Some(s) = r["restarting"].as_str() {
        line.push_str(&format!("; restarting {s}"));
    }
    if let Some(s) = r["waiting_for_confirm"].as_str() {
        line.push_str(&format!(
            "; restart {s} yourself, then run `seactl rollout confirm {s}`"
        ));
    }
    line
}

fn print_end(r: &Value) {
    let id = &r["id"];
    for s in r["restart"].as_array().into_iter().flatten() {
        println!(
            "  {:<20} {}{}",
            s["server"].as_str().unwrap_or(""),
            s["state"].as_str().unwrap_or(""),
            s["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    for w in r["warnings"].as_array().into_iter().flatten() {
        println!("  warning: {}", w.as_str().unwrap_or(""));
    }
    if r["state"] == "done" {
        println!(
            "Rollout {id} done: version {} is active ({} ms, of which {} ms beyond the restarts).",
            r["new_version"], r["elapsed_ms"], r["overhead_ms"]
        );
    } else {
        eprintln!(
            "Rollout {id} rolled back: {}. The old map is active again (version {}).",
            r["reason"].as_str().unwrap_or("?"),
            r["rollback_version"]
        );
    }
}

/// `seactl rollout`.
#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub command: RolloutCommand,
    #[command(flatten)]
    pub remote: Remote,
}

/// What to do with the running rollout.
#[derive(Debug, clap::Subcommand)]
pub enum RolloutCommand {
    /// Tell the rollout that SERVER was restarted by hand (its hook is `manual`).
    Confirm { server: String },
    /// Roll the running rollout back (refused once activation began).
    Abort,
    /// Show a rollout (the running one by default) and follow it to its end.
    Follow {
        /// The rollout id; default the running one.
        id: Option<u64>,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// List the latest rollouts.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

/// `seactl rollout confirm|abort|follow|list`.
pub fn rollout(args: RolloutArgs) -> Result<ExitCode> {
    let client = Client::new(&args.remote)?;
    match args.command {
        RolloutCommand::Confirm { server } => {
            let a = client.post("/v1/rollouts/current/confirm", &json!({ "server": server }))?;
            if a.status != 200 {
                return fail(false, &a);
            }
            println!(
                "Confirmed: {server} was restarted (rollout {}).",
                a.body["rollout"]
            );
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Abort => {
            let a = client.post("/v1/rollouts/current/abort", &json!({}))?;
            if a.status != 200 {
                return fail(false, &a);
            }
            println!("Rollout {} is rolling back.", a.body["rollout"]);
            Ok(ExitCode::SUCCESS)
        }
        RolloutCommand::Follow { id, output } => {
            let id = match id {
                Some(id) => id,
                None => {
                    let a = client.get("/v1/rollouts/current")?;
                    if a.status != 200 {
                        return fail(output == Output::Json, &a);
                    }
                    a.body["id"].as_u64().unwrap_or(0)
                }
            };
            follow(&client, id, output == Output::Json)
        }
        RolloutCommand::List { output } => {
            let a = client.get("/v1/rollouts?limit=20")?;
            if a.status != 200 {
                return fail(output == Output::Json, &a);
            }
            if output == Output::Json {
                println!("{}", pretty(&a.body));
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "  {:<4} {:<13} {:<6} {:<6} {:<24} reason",
                "id", "state", "from", "to", "restarted"
            );
            for r in a.body["rollouts"].as_array().into_iter().flatten() {
                let restarted: Vec<&str> = r["restart"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|s| s["state"] == "healthy")
                    .filter_map(|s| s["server"].as_str())
                    .collect();
                let num = |v: &Value| v.as_u64().map(|n| n.to_string()).unwrap_or("-".into());
                println!(
                    "  {:<4} {:<13} {:<6} {:<6} {:<24} {}",
                    num(&r["id"]),
                    r["state"].as_str().unwrap_or(""),
                    num(&r["from_version"]),
                    num(&r["new_version"]),
                    restarted.join(","),
                    r["reason"].as_str().unwrap_or("")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `seactl status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub remote: Remote,
}

/// Active version, each Envoy's ACK/NACK, each server's health. Exits 1 when a
/// connected Envoy does not run the current version or a server is down.
pub fn status(args: StatusArgs) -> Result<ExitCode> {
    let client = Client::new(&args.remote)?;
    let s = client.get("/v1/status")?;
    if s.status != 200 {
        return Err(anyhow!("{}", describe_error(&s)));
    }
    let b = &s.body;
    if args.output == Output::Json {
        println!("{}", pretty(b));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "Active map: version {} ({}, by {})",
        b["version"],
        b["kind"].as_str().unwrap_or(""),
        b["author"].as_str().unwrap_or("")
    );
    println!(
        "  filter config {}, clusters {}",
        b["ecds_version"].as_str().unwrap_or(""),
        b["cds_version"].as_str().unwrap_or("")
    );
    let mut healthy = true;
    if b["rollout"].is_object() {
        healthy = false;
        println!(
            "\nRollout {} running ({:.1}s): {}",
            b["rollout"]["id"],
            b["rollout"]["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0,
            progress_line(&b["rollout"])
        );
    }
    println!("\nEnvoys:");
    let nodes = b["nodes"].as_array().cloned().unwrap_or_default();
    if nodes.is_empty() {
        println!("  (none has connected yet)");
    }
    println!(
        "  {:<30} {:<24} {:<13} {:<8} {:<8} last NACK",
        "instance (node@peer)", "role", "state", "map", "clusters"
    );
    for n in &nodes {
        let ecds = &n["types"]["ecds"];
        let nack = match (ecds["nacked_version"].as_str(), ecds["nack_error"].as_str()) {
            (Some(v), Some(e)) => format!("{v}: {e}"),
            _ => String::new(),
        };
        let state = n["state"]["ecds"].as_str().unwrap_or("");
        healthy &= state == "current" || state == "disconnected";
        let role = match n["role"]["kind"].as_str() {
            Some("guard") => format!("guard of {}", n["role"]["server"].as_str().unwrap_or("?")),
            _ => "edge".to_owned(),
        };
        println!(
            "  {:<30} {:<24} {:<13} {:<8} {:<8} {}",
            n["instance"].as_str().unwrap_or(""),
            role,
            state,
            n["map_version"]
                .as_u64()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            n["state"]["cds"].as_str().unwrap_or(""),
            nack
        );
    }
    let conflicts = b["conflicts"].as_array().cloned().unwrap_or_default();
    if !conflicts.is_empty() {
        healthy = false;
        println!("\nNode id CONFLICTS (rollouts waiting for these ids refuse to run):");
        for c in &conflicts {
            println!(
                "  `{}` is held by more than one Envoy:",
                c["id"].as_str().unwrap_or("")
            );
            for p in c["instances"].as_array().into_iter().flatten() {
                let from: Vec<&str> = p["streams_from"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                println!(
                    "    {:<30} {}",
                    p["instance"].as_str().unwrap_or(""),
                    if p["connected"] == true {
                        format!("connected, streams from {}", from.join(", "))
                    } else {
                        "disconnected (it may still serve with an old map)".into()
                    }
                );
            }
        }
        println!(
            "  Give each Envoy its own --node-id; forget one out of service: DELETE /v1/nodes/INSTANCE"
        );
    }
    println!("\ndtable-servers:");
    for sv in b["servers"].as_array().into_iter().flatten() {
        let h = &sv["health"];
        let up = h["up"] == true;
        healthy &= up;
        let assigned = &sv["assigned"];
        let mut what: Vec<String> = Vec::new();
        if assigned["default"] == true {
            what.push("default".into());
        }
        let slots: Vec<&str> = assigned["slots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !slots.is_empty() {
            what.push(format!("slots {}", slots.join(",")));
        }
        let pins = assigned["pins"].as_array().map(Vec::len).unwrap_or(0);
        if pins > 0 {
            what.push(format!("{pins} pin(s)"));
        }
        let guards: Vec<String> = sv["guards"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|g| {
                format!(
                    "{}{}",
                    g["instance"].as_str().unwrap_or(""),
                    if g["connected"] == true {
                        ""
                    } else {
                        " (disconnected)"
                    }
                )
            })
            .collect();
        if sv["guarded"] == true || !guards.is_empty() {
            what.push(format!(
                "{} by {}",
                if sv["guarded"] == true {
                    "guarded"
                } else {
                    "guards (not `guarded`)"
                },
                if guards.is_empty() {
                    "NO GUARD".into()
                } else {
                    guards.join(", ")
                }
            ));
        }
        println!(
            "  {:<20} {:<22} {:<5} {}{}",
            sv["name"].as_str().unwrap_or(""),
            sv["address"].as_str().unwrap_or(""),
            if up { "up" } else { "DOWN" },
            what.join("; "),
            h["error"]
                .as_str()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
