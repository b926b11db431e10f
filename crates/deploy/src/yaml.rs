//! A small YAML writer for JSON values, enough for Kubernetes manifests.
//!
//! Every JSON value has one YAML spelling here: mappings and sequences in block
//! style, strings double-quoted as JSON quotes them (a JSON string is a valid YAML
//! double-quoted scalar, so no value is ever read back as a number, a boolean or a
//! date) except keys made only of safe characters and multi-line strings, which are
//! written as literal blocks (`|`) when that round-trips exactly. Object keys keep
//! their order (`serde_json` with sorted maps: deterministic output).

use serde_json::Value;

/// `docs` as one YAML stream: `---` between documents.
pub fn documents(docs: &[Value]) -> String {
    let mut out = String::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&to_string(d));
    }
    out
}

/// Keys a Kubernetes object opens with, in this order; the others follow sorted.
const FIRST: [&str; 3] = ["apiVersion", "kind", "metadata"];

/// One value as a YAML document (ends with a newline).
pub fn to_string(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => {
            let mut ordered = serde_json::Map::new();
            for k in FIRST {
                if let Some(v) = m.get(k) {
                    ordered.insert(k.to_owned(), v.clone());
                }
            }
            write_map(&mut out, &ordered, 0);
            let rest: serde_json::Map<String, Value> = m
                .iter()
                .filter(|(k, _)| !FIRST.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            write_map(&mut out, &rest, 0);
        }
        Value::Array(a) if !a.is_empty() => write_seq(&mut out, a, 0),
        other => {
            out.push_str(&scalar(other, 0));
            out.push('\n');
        }
    }
    out
}

fn indent(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

fn write_map(out: &mut String, m: &serde_json::Map<String, Value>, ind: usize) {
    for (k, v) in m {
        indent(out, ind);
        out.push_str(&key(k));
        out.push(':');
        write_child(out, v, ind);
    }
}

fn write_seq(out: &mut String, a: &[Value], ind: usize) {
    for v in a {
        indent(out, ind);
        out.push('-');
        match v {
            // A mapping in a sequence starts on the dash's line.
            Value::Object(m) if !m.is_empty() => {
                let mut first = true;
                for (k, v) in m {
                    if first {
                        out.push(' ');
                        first = false;
                    } else {
                        indent(out, ind + 2);
                    }
                    out.push_str(&key(k));
                    out.push(':');
                    write_child(out, v, ind + 2);
                }
            }
            Value::Array(inner) if !inner.is_empty() => {
                out.push('\n');
                write_seq(out, inner, ind + 2);
            }
            other => {
                out.push(' ');
                out.push_str(&scalar(other, ind + 2));
                out.push('\n');
            }
        }
    }
}

/// What follows `key:` at indentation `ind`.
fn write_child(out: &mut String, v: &Value, ind: usize) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            write_map(out, m, ind + 2);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            write_seq(out, a, ind);
        }
        other => {
            out.push(' ');
            out.push_str(&scalar(other, ind + 2));
            out.push('\n');
        }
    }
}

/// A key: bare when it is made of letters, digits and `-_./` and starts with a
/// letter; else JSON-quoted.
fn key(k: &str) -> String {
    let bare = k.starts_with(|c: char| c.is_ascii_alphabetic())
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && !matches!(
            k.to_ascii_lowercase().as_str(),
            "y" | "n" | "yes" | "no" | "on" | "off" | "true" | "false" | "null"
        );
    if bare { k.to_owned() } else { quote(k) }
}

fn quote(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// A scalar (or an empty mapping or sequence) at indentation `ind`.
fn scalar(v: &Value, ind: usize) -> String {
    match v {
        Value::String(s) if literal_ok(s) => {
            let mut block = String::from("|");
            if !s.ends_with('\n') {
                block.push('-');
            }
            for line in s.strip_suffix('\n').unwrap_or(s).split('\n') {
                block.push('\n');
                if !line.is_empty() {
                    indent(&mut block, ind);
                    block.push_str(line);
                }
            }
            block
        }
        Value::String(s) => quote(s),
        Value::Object(_) => "{}".to_owned(),
        Value::Array(_) => "[]".to_owned(),
        other => other.to_string(),
    }
}

/// A multi-line string that a literal block gives back exactly: printable lines, no
/// trailing spaces, no leading space on the first line, at most one final newline.
fn literal_ok(s: &str) -> bool {
    s.contains('\n')
        && !s.starts_with([' ', '\n'])
        && !s.ends_with("\n\n")
        && s.split('\n')
            .all(|l| !l.ends_with([' ', '\t']) && l.chars().all(|c| c == '\t' || !c.is_control()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_block_style_with_quoted_strings() {
        let v = json!({
            "apiVersion": "v1",
            "metadata": {"name": "a", "labels": {"app.kubernetes.io/name": "seashard"}},
            "spec": {"ports": [{"name": "grpc", "port": 18000}], "empty": {}, "none": []},
            "data": {"seashard.toml": "[listen]\ngrpc = \"0.0.0.0:18000\"\n", "on": "yes"}
        });
        let y = to_string(&v);
        assert_eq!(
            y,
            "apiVersion: \"v1\"\nmetadata:\n  labels:\n    app.kubernetes.io/name: \"seashard\"\n  name: \"a\"\ndata:\n  \"on\": \"yes\"\n  seashard.toml: |\n    [listen]\n    grpc = \"0.0.0.0:18000\"\nspec:\n  empty: {}\n  none: []\n  ports:\n  - name: \"grpc\"\n    port: 18000\n"
        );
    }

    #[test]
    fn strings_that_a_block_would_change_are_quoted() {
        for s in ["a \nb", " a\nb", "a\n\n", "a\u{7}\nb", "one line"] {
            assert_eq!(scalar(&json!(s), 2), quote(s), "{s:?}");
        }
        assert_eq!(scalar(&json!("a\n\nb"), 2), "|-\n  a\n\n  b");
    }

    #[test]
    fn nested_sequences_and_documents() {
        let y = documents(&[json!({"a": [[1, 2], {"b": [true]}]}), json!({"c": null})]);
        assert_eq!(y, "a:\n-\n  - 1\n  - 2\n- b:\n  - true\n---\nc: null\n");
    }
}
