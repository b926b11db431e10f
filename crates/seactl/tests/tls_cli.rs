//! `seactl certs` and `seactl` against an HTTPS API (`[api.tls]`), as an operator
//! runs them.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

mod common;
use common::{Serve, config_in, text};

const TOKEN: &str = "tls-cli-token-0123456";

fn seactl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_seactl"));
    // An operator's SEASHARD_CA must not leak into these runs.
    c.env_remove("SEASHARD_CA").stdin(Stdio::null());
    c
}

fn certs(args: &[&str]) -> Output {
    seactl().arg("certs").args(args).output().unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn certs_are_private_and_never_overwritten_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tls");
    let d = dir.to_str().unwrap();
    for args in [
        &["init", "--dir", d][..],
        &[
            "server",
            "--dir",
            d,
            "--san",
            "127.0.0.1",
            "--san",
            "cp.example",
        ],
        &["client", "--dir", d, "--node-id", "edge-1"],
    ] {
        let o = certs(args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    }
    assert_eq!(mode(&dir), 0o700);
    let files = [
        "ca.crt",
        "ca.key",
        "control-plane.crt",
        "control-plane.key",
        "edge-1.crt",
        "edge-1.key",
    ];
    for f in files {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();

    // Again: each refused with a clear error, nothing changed.
    for args in [
        &["init", "--dir", d][..],
        &["server", "--dir", d, "--san", "127.0.0.1"],
        &["client", "--dir", d, "--node-id", "edge-1"],
    ] {
        let o = certs(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        let t = text(&o);
        assert!(t.contains("exists") && t.contains("--force"), "{t}");
    }
    let after: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(dir.join(f)).unwrap())
        .collect();
    assert_eq!(before, after, "a refused run changed a file");
    // No key is ever printed.
    let o = certs(&["client", "--dir", d, "--node-id", "edge-2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("PRIVATE KEY"), "{}", text(&o));

    // --force replaces, still 0600.
    let o = certs(&["client", "--dir", d, "--node-id", "edge-1", "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_ne!(std::fs::read(dir.join("edge-1.key")).unwrap(), before[5]);
    assert_eq!(mode(&dir.join("edge-1.key")), 0o600);

    // No CA yet: says how to make one.
    let o = certs(&[
        "client",
        "--dir",
        tmp.path().join("empty").to_str().unwrap(),
        "--node-id",
        "edge-1",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("seactl certs init"), "{}", text(&o));
}

#[test]
fn status_over_https_is_verified_against_the_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = dir.join("tls");
    let ds = d.to_str().unwrap();
    for args in [
        &["init", "--dir", ds][..],
        &[
            "server",
            "--dir",
            ds,
            "--san",
            "127.0.0.1",
            "--san",
            "localhost",
        ],
    ] {
        assert!(certs(args).status.success());
    }
    let (config, http) = config_in(
        dir,
        &format!(
            r#"
            [api]
            token = "{TOKEN}"
            [api.tls]
            cert = "tls/control-plane.crt"
            key = "tls/control-plane.key"
            [[server]]
            name = "dtable-server"
            address = "127.0.0.1:1"
            "#
        ),
    );
    let o = seactl()
        .args(["serve", "--check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let _serve = Serve::start(
        seactl()
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn"),
        http,
    );
    let ca = d.join("ca.crt");
    let status = |url: &str, ca: Option<&Path>| {
        let mut c = seactl();
        c.args(["status", "--output", "json", "--url", url])
            .env("SEASHARD_TOKEN", TOKEN);
        if let Some(ca) = ca {
            c.arg("--ca").arg(ca);
        }
        c.output().unwrap()
    };
    let https = format!("https://127.0.0.1:{http}");

    // With the CA: the answer, by address and by name.
    for url in [https.clone(), format!("https://localhost:{http}")] {
        let o = status(&url, Some(&ca));
        assert!(o.status.success(), "{url}: {}", text(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["version"], 1, "{v}");
    }
    // SEASHARD_CA works as --ca.
    let o = seactl()
        .args(["status", "--url", &https])
        .env("SEASHARD_TOKEN", TOKEN)
        .env("SEASHARD_CA", &ca)
        .output()
        .unwrap();
    // (Non-zero: the one server is down; the answer came.)
    assert!(text(&o).contains("Active map: version 1"), "{}", text(&o));

    // Without it (the webpki roots do not know this CA): refused, naming TLS and
    // the certificate, and how to fix it.
    let o = status(&https, None);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("certificate"), "{t}");
    assert!(t.contains("TLS") && t.contains("--ca"), "{t}");
    assert!(o.stdout.is_empty(), "{t}");

    // Another CA: refused the same way.
    let other = dir.join("other");
    assert!(
        certs(&["init", "--dir", other.to_str().unwrap()])
            .status
            .success()
    );
    let o = status(&https, Some(&other.join("ca.crt")));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("TLS"), "{}", text(&o));

    // Plain HTTP to the HTTPS API: refused with a hint.
    let o = status(&format!("http://127.0.0.1:{http}"), None);
    assert!(!o.status.success());
    assert!(text(&o).contains("https://"), "{}", text(&o));
}
