//! The control plane's HTTP API, from the command line: a small blocking client
//! (replicas tried in turn, TLS against `--ca`), and the commands built on it, one
//! module per family: `push` (`push-map`), `rollout` (`rollout ...`, and following a
//! rollout to its end), `status`.

mod push;
mod rollout;
mod status;

pub use push::{PushMapArgs, push_map};
pub use rollout::{RolloutArgs, rollout};
pub use status::{StatusArgs, status};

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Where the control plane is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// The control plane's HTTP API. Replicas: several URLs separated by commas,
    /// tried in turn (the next one on a connection error or timeout, or a `503`
    /// saying this replica cannot change anything now); the one that answered is
    /// kept for the rest of the command.
    #[arg(
        long,
        env = "SEASHARD_URL",
        default_value = "http://127.0.0.1:18080",
        value_name = "URL[,URL...]"
    )]
    pub url: String,
    /// The API token: the change token, or the read-only token for reads.
    #[arg(long, env = "SEASHARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// For an https:// URL: the CA (PEM) that signed the control plane's certificate
    /// (`seactl certs init` makes one). Without it, the webpki (Mozilla) roots.
    #[arg(long, env = "SEASHARD_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

/// The URLs of `--url`/`SEASHARD_URL`, without a trailing `/`: one, or several
/// separated by commas. Refused: none, an empty one, one given twice, one that is not
/// `http://` or `https://`.
fn urls(list: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for url in list.split(',').map(str::trim) {
        if url.is_empty() {
            bail!(
                "--url/SEASHARD_URL `{list}` holds an empty URL (several are separated by commas)"
            );
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--url/SEASHARD_URL: `{url}` is not an http:// or https:// URL");
        }
        let url = url.trim_end_matches('/').to_owned();
        if out.contains(&url) {
            bail!("--url/SEASHARD_URL: `{url}` is given twice");
        }
        out.push(url);
    }
    Ok(out)
}

/// How `remote` is reached over TLS: its CA alone when given, else the webpki
/// (Mozilla) roots. The CA is for https:// URLs only; with http:// it is not used.
fn tls_config(remote: &Remote, urls: &[String]) -> Result<ureq::tls::TlsConfig> {
    let builder = ureq::tls::TlsConfig::builder();
    let Some(ca) = &remote.ca else {
        return Ok(builder.build());
    };
    let clear: Vec<&str> = urls
        .iter()
        .filter(|u| !u.starts_with("https://"))
        .map(String::as_str)
        .collect();
    if !clear.is_empty() {
        eprintln!(
            "seactl: note: --ca/SEASHARD_CA {} is not used for {}: not an https:// URL \
             (the token and everything else travel in clear)",
            ca.display(),
            clear.join(", ")
        );
    }
    if clear.len() == urls.len() {
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
    if let Some(u) = e.chain().find_map(|c| c.downcast_ref::<NoneAnswered>()) {
        return u.hint;
    }
    let is_rustls =
        |e: &(dyn std::error::Error + 'static)| e.downcast_ref::<rustls::Error>().is_some();
    e.chain()
        .find_map(|c| ureq_hint(c.downcast_ref::<ureq::Error>()?, &is_rustls))
}

fn ureq_hint(
    e: &ureq::Error,
    is_rustls: &dyn Fn(&(dyn std::error::Error + 'static)) -> bool,
) -> Option<&'static str> {
    match e {
        ureq::Error::Rustls(_) | ureq::Error::Tls(_) => Some(UNTRUSTED),
        ureq::Error::Io(io) if io.get_ref().is_some_and(|inner| is_rustls(inner)) => {
            Some(UNTRUSTED)
        }
        ureq::Error::Protocol(_) => Some(
            "the answer is not HTTP: if the control plane serves HTTPS ([api.tls]), use an \
             https:// URL",
        ),
        _ => None,
    }
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
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
}

/// A blocking client of the API, over one or several URLs (replicas).
struct Client {
    bases: Vec<String>,
    /// The index in `bases` of the URL that answered last: asked first.
    current: std::cell::Cell<usize>,
    token: Option<String>,
    agent: ureq::Agent,
}

/// The `code` of a `503` from a replica that cannot change anything now, while
/// another may: the next URL is tried.
const NOT_SERVING_CODES: [&str; 3] = ["not_leader", "no_leader", "etcd_unavailable"];

/// Every URL was tried and none gave an answer to use: each URL with its error.
#[derive(Debug)]
struct NoneAnswered {
    tried: Vec<(String, String)>,
    /// The TLS or protocol hint of the first failure that has one.
    hint: Option<&'static str>,
}

impl std::fmt::Display for NoneAnswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "none of the {} control plane URLs answered:",
            self.tried.len()
        )?;
        for (url, err) in &self.tried {
            write!(f, "\n  {url}: {err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for NoneAnswered {}

impl Client {
    fn new(remote: &Remote) -> Result<Client> {
        let bases = urls(&remote.url)?;
        Ok(Client {
            token: remote.token.clone(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                // A replica that is gone (no RST) costs this much before the next URL.
                .timeout_connect(Some(Duration::from_secs(5)))
                .tls_config(tls_config(remote, &bases)?)
                .build()
                .into(),
            bases,
            current: std::cell::Cell::new(0),
        })
    }

    fn get(&self, path: &str) -> Result<Answer> {
        self.call("GET", path, None)
    }

    fn post(&self, path: &str, body: &Value) -> Result<Answer> {
        self.call("POST", path, Some(body))
    }

    /// Sends the request to the current URL, and to the next ones while it fails
    /// where another replica may succeed: no connection (or a GET's answer lost), or
    /// a `503` with a code of [`NOT_SERVING_CODES`]; a `not_leader` answer naming the
    /// leader's API among our URLs sends it there next (never to a URL not given: the
    /// token goes only where the operator said). A POST that may have reached a
    /// replica is not sent again. With one URL, its answer or error as it comes.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer> {
        if let [base] = &self.bases[..] {
            return self.call_one(base, method, path, body).map_err(|(e, _)| e);
        }
        let n = self.bases.len();
        // The order to try: the current URL first, then the others in turn.
        let mut order: Vec<usize> = (0..n).map(|k| (self.current.get() + k) % n).collect();
        let mut tried = Vec::with_capacity(n);
        let mut hint = None;
        let mut k = 0;
        while k < order.len() {
            let i = order[k];
            k += 1;
            let base = &self.bases[i];
            match self.call_one(base, method, path, body) {
                Ok(a) if a.status == 503 && not_serving(&a) => {
                    tried.push((base.clone(), describe_error(&a)));
                    let leader = a.body["leader"]["api"].as_str().unwrap_or_default();
                    let leader = leader.trim_end_matches('/');
                    if let Some(at) = order[k..].iter().position(|&j| self.bases[j] == leader) {
                        let j = order.remove(k + at);
                        order.insert(k, j);
                    }
                }
                Ok(a) => {
                    self.current.set(i);
                    return Ok(a);
                }
                Err((e, retry)) => {
                    if !retry {
                        return Err(e);
                    }
                    hint = hint.or_else(|| tls_hint(&e));
                    tried.push((base.clone(), format!("{e:#}")));
                }
            }
        }
        Err(NoneAnswered { tried, hint }.into())
    }

    /// One request to one URL; an error says whether another URL may be tried.
    fn call_one(
        &self,
        base: &str,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, (anyhow::Error, bool)> {
        let url = format!("{base}{path}");
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let sent = match body {
            None => {
                let mut req = self.agent.get(&url);
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.call()
            }
            Some(body) => {
                let mut req = self
                    .agent
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("x-seashard-author", &author());
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.send(body.to_string())
            }
        };
        let resp = sent.map_err(|e| {
            // A read is asked again anywhere; a change only where it surely was not
            // received (else it could be applied twice).
            let retry = body.is_none() || not_delivered(&e);
            let e = anyhow::Error::new(e).context(format!("{method} {url}"));
            if retry || self.bases.len() == 1 {
                (e, retry)
            } else {
                let e = e.context(
                    "the request may have reached the control plane: not sent to another \
                     replica; see `seactl status` or `seactl rollout list`",
                );
                (e, false)
            }
        })?;
        answer(resp, &url).map_err(|e| (e, body.is_none()))
    }
}

/// A `503` from a replica that cannot change anything now (not the leader, no
/// leader, no etcd majority).
fn not_serving(a: &Answer) -> bool {
    a.body["code"]
        .as_str()
        .is_some_and(|c| NOT_SERVING_CODES.contains(&c))
}

/// An error that happened before the request could reach the server: name
/// resolution, connecting, the TLS handshake.
fn not_delivered(e: &ureq::Error) -> bool {
    use std::io::ErrorKind as K;
    use ureq::Timeout as T;
    match e {
        ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed
        | ureq::Error::Timeout(T::Resolve | T::Connect)
        | ureq::Error::Tls(_)
        | ureq::Error::Rustls(_)
        | ureq::Error::Pem(_) => true,
        ureq::Error::Io(io) => matches!(
            io.kind(),
            K::ConnectionRefused
                | K::AddrNotAvailable
                | K::NetworkUnreachable
                | K::HostUnreachable
                | K::NotConnected
        ),
        _ => false,
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

fn fail(json_out: bool, a: &Answer) -> Result<ExitCode> {
    if json_out {
        println!("{}", pretty(&a.body));
    } else {
        eprintln!("{}", describe_error(a));
    }
    Ok(ExitCode::FAILURE)
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

/// A JSON string's text; `""` for anything else.
fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// The strings of a JSON array (other items skipped; none if `v` is not an array).
fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use std::time::Instant;

    use serde_json::json;

    use super::*;

    const TOKEN: &str = "client-test-token-123";

    /// What a test server does with a request.
    #[derive(Clone)]
    enum Behaviour {
        /// Answers this status and JSON body.
        Answer(u16, String),
        /// Reads the request, then closes without answering.
        Hang,
    }

    /// A loopback HTTP server in a thread, counting requests; stops on drop.
    struct Server {
        url: String,
        hits: Arc<AtomicUsize>,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Server {
        fn start(b: Behaviour) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let hits = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let (h, s) = (hits.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            h.fetch_add(1, Ordering::Relaxed);
                            let _ = serve(conn, &b);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
            Server {
                url,
                hits,
                stop,
                thread: Some(thread),
            }
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::Relaxed)
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn serve(conn: TcpStream, b: &Behaviour) -> std::io::Result<()> {
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut r = BufReader::new(conn.try_clone()?);
        let mut len = 0;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
            if let Some((n, v)) = line.split_once(':')
                && n.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        match b {
            Behaviour::Answer(status, json) => {
                let mut w = conn;
                write!(
                    w,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{json}",
                    json.len()
                )
            }
            Behaviour::Hang => Ok(()),
        }
    }

    /// A loopback URL where nothing listens.
    fn closed_url() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    fn client(urls: &[&str]) -> Client {
        Client::new(&Remote {
            url: urls.join(","),
            token: Some(TOKEN.into()),
            ca: None,
        })
        .unwrap()
    }

    fn answer(status: u16, json: &str) -> Behaviour {
        Behaviour::Answer(status, json.to_owned())
    }

    fn ok() -> Behaviour {
        answer(200, r#"{"ok":true}"#)
    }

    fn not_leader() -> Behaviour {
        answer(
            503,
            r#"{"error":"this replica is not the leader","code":"not_leader"}"#,
        )
    }

    #[test]
    fn fails_over_from_a_closed_port_and_keeps_the_one_that_answered() {
        let closed = closed_url();
        let (busy, ok) = (Server::start(not_leader()), Server::start(ok()));
        let c = client(&[&closed, &busy.url, &ok.url]);
        for path in ["/v1/status", "/v1/nodes"] {
            let a = c.get(path).unwrap();
            assert_eq!((a.status, &a.body["ok"]), (200, &Value::Bool(true)));
        }
        let a = c.post("/v1/maps", &json!({})).unwrap();
        assert_eq!(a.status, 200);
        // The first call went through the refusing replica once; the next ones
        // straight to the one that answered.
        assert_eq!((busy.hits(), ok.hits()), (1, 3));
        assert_eq!(c.current.get(), 2);
    }

    #[test]
    fn a_not_leader_answer_naming_one_of_the_urls_sends_it_there_next() {
        let (other, leader) = (Server::start(ok()), Server::start(ok()));
        // The leader's URL as the replica advertises it, with a trailing `/`.
        let body = format!(
            r#"{{"error":"this replica does not lead","code":"not_leader",
                "leader":{{"replica":"cp-3","api":"{}/"}}}}"#,
            leader.url
        );
        let follower = Server::start(answer(503, &body));
        let c = client(&[&follower.url, &other.url, &leader.url]);
        assert_eq!(c.post("/v1/maps", &json!({})).unwrap().status, 200);
        assert_eq!((follower.hits(), other.hits(), leader.hits()), (1, 0, 1));
        assert_eq!(c.current.get(), 2);
        // A leader that is none of our URLs is not asked: the token stays with them.
        let stranger = Server::start(ok());
        let body = format!(
            r#"{{"error":"x","code":"not_leader","leader":{{"api":"{}"}}}}"#,
            stranger.url
        );
        let follower = Server::start(answer(503, &body));
        let c = client(&[&follower.url, &other.url]);
        assert_eq!(c.post("/v1/maps", &json!({})).unwrap().status, 200);
        assert_eq!((stranger.hits(), other.hits()), (0, 1));
    }

    #[test]
    fn an_http_answer_is_not_failed_over() {
        for b in [
            answer(409, r#"{"error":"stale base version","code":"conflict"}"#),
            answer(401, r#"{"error":"unauthorized"}"#),
            answer(503, r#"{"error":"busy","code":"rollout_running"}"#),
        ] {
            let (first, second) = (Server::start(b), Server::start(ok()));
            let c = client(&[&first.url, &second.url]);
            let a = c.post("/v1/maps", &json!({})).unwrap();
            assert_ne!(a.status, 200);
            assert_eq!((first.hits(), second.hits()), (1, 0));
        }
    }

    #[test]
    fn when_none_answers_the_error_names_each_url() {
        let closed = closed_url();
        let busy = Server::start(answer(
            503,
            r#"{"error":"etcd has no majority","code":"etcd_unavailable"}"#,
        ));
        let c = client(&[&closed, &busy.url]);
        let err = format!("{:#}", c.get("/v1/status").unwrap_err());
        assert!(
            err.contains("none of the 2 control plane URLs answered"),
            "{err}"
        );
        assert!(
            err.contains(&format!("{closed}: GET {closed}/v1/status")),
            "{err}"
        );
        assert!(
            err.contains(&format!("{}: etcd has no majority (503)", busy.url)),
            "{err}"
        );
        assert!(!err.contains(TOKEN), "{err}");
    }

    #[test]
    fn a_change_that_may_have_arrived_is_not_sent_again() {
        let (hang, ok) = (Server::start(Behaviour::Hang), Server::start(ok()));
        let c = client(&[&hang.url, &ok.url]);
        let err = format!("{:#}", c.post("/v1/maps", &json!({})).unwrap_err());
        assert!(err.contains("may have reached"), "{err}");
        assert_eq!((hang.hits(), ok.hits()), (1, 0));
        // A read is asked again elsewhere.
        assert_eq!(c.get("/v1/status").unwrap().status, 200);
        assert_eq!((hang.hits(), ok.hits()), (2, 1));
    }

    #[test]
    fn one_url_as_before() {
        let closed = closed_url();
        let c = client(&[&closed]);
        let err = format!("{:#}", c.get("/v1/status").unwrap_err());
        assert!(err.starts_with(&format!("GET {closed}/v1/status")), "{err}");
        let busy = Server::start(not_leader());
        let a = client(&[&busy.url]).get("/v1/status").unwrap();
        assert_eq!(a.status, 503);
    }

    #[test]
    fn url_lists() {
        assert_eq!(
            urls("http://a:1/, https://b:2").unwrap(),
            ["http://a:1", "https://b:2"]
        );
        for (bad, says) in [
            ("", "empty"),
            ("http://a:1,", "empty"),
            ("http://a:1,,http://b:1", "empty"),
            ("http://a:1,http://a:1/", "given twice"),
            ("a:1", "not an http:// or https:// URL"),
        ] {
            let err = urls(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }
}
