//! Every validation error, with its message and location.

use shardmap::{Fence, RouterConfig, ShardMap};

fn problems(json: &str) -> Vec<String> {
    match ShardMap::from_json(json) {
        Ok(_) => vec![],
        Err(p) => p.iter().map(|p| p.to_string()).collect(),
    }
}

fn assert_one(json: &str, expected: &str) {
    let got = problems(json);
    assert!(
        got.iter().any(|p| p.contains(expected)),
        "expected a problem containing {expected:?}, got {got:?}"
    );
}

#[test]
fn the_documented_map_is_valid() {
    let json = r#"{"default": "dtable-server",
        "slots": {"0-9": "dtable-server-2", "a-f": "dtable-server"},
        "pins": {"ff84e1a1-66e2": "dtable-server-2"},
        "paths": [{"prefix": "/api/v1/admin/", "server": "dtable-server"},
                  {"regex": "(?i)^/api/v1/internal/stats", "server": "dtable-server-2"}]}"#;
    assert_eq!(problems(json), Vec::<String>::new());
}

#[test]
fn a_default_only_map_is_valid() {
    assert_eq!(
        problems(r#"{"default": "dtable-server"}"#),
        Vec::<String>::new()
    );
}

#[test]
fn default_missing() {
    assert_one(r#"{"slots": {"0-f": "a"}}"#, "default: missing");
}

#[test]
fn unknown_fields_are_refused() {
    assert_one(r#"{"default": "a", "slot": {}}"#, "unknown field `slot`");
    assert_one(
        r#"{"default": "a", "paths": [{"prefix": "/x", "server": "a", "weight": 2}]}"#,
        "unknown field `weight`",
    );
}

#[test]
fn slot_gaps_name_the_hex_ranges() {
    assert_one(
        r#"{"default": "a", "slots": {"0-7": "a", "a-f": "b"}}"#,
        "gap: no slot covers 8-9",
    );
    assert_one(
        r#"{"default": "a", "slots": {"1-f": "a"}}"#,
        "gap: no slot covers 0",
    );
    assert_one(
        r#"{"default": "a", "slots": {"0-e": "a"}}"#,
        "gap: no slot covers f",
    );
    assert_one(
        r#"{"default": "a", "slots": {"00-3f": "a", "5-f": "b"}}"#,
        "gap: no slot covers 4",
    );
    assert_one(
        r#"{"default": "a", "slots": {"0-3": "a", "400-4fe": "a", "5-f": "b"}}"#,
        "gap: no slot covers 4ff",
    );
}

#[test]
fn slot_overlaps_name_both_slots_and_the_range() {
    assert_one(
        r#"{"default": "a", "slots": {"0-9": "a", "8-f": "b"}}"#,
        "slots.\"8-f\": overlaps slot `0-9` on 8-9",
    );
    assert_one(
        r#"{"default": "a", "slots": {"0-f": "a", "3f": "b"}}"#,
        "overlaps slot `0-f` on 3f",
    );
}

#[test]
fn bad_slot_keys() {
    assert_one(
        r#"{"default": "a", "slots": {"0-f": "a", "x": "a"}}"#,
        "slots.\"x\": `x` is not a hex range",
    );
    assert_one(
        r#"{"default": "a", "slots": {"0-99": "a"}}"#,
        "same number of hex digits",
    );
    assert_one(
        r#"{"default": "a", "slots": {"00000-fffff": "a"}}"#,
        "at most 4 hex digits",
    );
    assert_one(
        r#"{"default": "a", "slots": {"f-0": "a"}}"#,
        "start is after its end",
    );
}

#[test]
fn server_names() {
    assert_one(
        r#"{"default": "a", "slots": {"0-f": ""}}"#,
        "slots.\"0-f\": the server name is empty",
    );
    assert_one(
        r#"{"default": "bad name"}"#,
        "default: server name `bad name` is not a valid Envoy cluster name",
    );
    assert_one(r#"{"default": "-x"}"#, "not a valid Envoy cluster name");
    assert_one(
        &format!(r#"{{"default": "{}"}}"#, "a".repeat(64)),
        "longer than 63 characters",
    );
    assert_one(
        r#"{"default": "a", "pins": {"ab": "x\ny"}}"#,
        "not a valid Envoy cluster name",
    );
}

#[test]
fn bad_pins() {
    assert_one(
        r#"{"default": "a", "pins": {"xyz": "a"}}"#,
        "pins.\"xyz\": `xyz` is not a uuid prefix",
    );
    assert_one(
        r#"{"default": "a", "pins": {"ff84e1a166e24a3b9c1d0123456789abc": "a"}}"#,
        "longer than a base_uuid",
    );
    assert_one(
        r#"{"default": "a", "pins": {"ff84-e1a1": "a"}}"#,
        "no `-` at position 5",
    );
    assert_one(
        r#"{"default": "a", "pins": {"FF84": "a", "ff84": "b"}}"#,
        "the same pin as `FF84`",
    );
}

#[test]
fn bad_path_rules() {
    assert_one(
        r#"{"default": "a", "paths": [{"regex": "(unclosed", "server": "a"}]}"#,
        "paths[0].regex: does not compile",
    );
    assert_one(
        r#"{"default": "a", "paths": [{"regex": "a{1000}{1000}", "server": "a"}]}"#,
        "paths[0].regex: does not compile",
    );
    assert_one(
        &format!(
            r#"{{"default": "a", "paths": [{{"regex": "{}", "server": "a"}}]}}"#,
            "a".repeat(1025)
        ),
        "more than the limit of 1024",
    );
    assert_one(
        r#"{"default": "a", "paths": [{"prefix": "api", "server": "a"}]}"#,
        "paths[0].prefix: `api` does not start with `/`",
    );
    assert_one(
        r#"{"default": "a", "paths": [{"prefix": "/a", "regex": "b", "server": "a"}]}"#,
        "not both",
    );
    assert_one(
        r#"{"default": "a", "paths": [{"server": "a"}]}"#,
        "paths[0]: a path rule needs `prefix` or `regex`",
    );
    assert_one(
        r#"{"default": "a", "paths": [{"prefix": "/a"}]}"#,
        "paths[0].server: the server name is empty",
    );
}

#[test]
fn size_limits() {
    let pins: Vec<String> = (0..=shardmap::MAX_PINS)
        .map(|i| format!("\"{i:08x}\": \"a\""))
        .collect();
    assert_one(
        &format!(r#"{{"default": "a", "pins": {{{}}}}}"#, pins.join(",")),
        "10001 pins, more than the limit of 10000",
    );
    let rules: Vec<&str> = (0..=shardmap::MAX_PATH_RULES)
        .map(|_| r#"{"prefix": "/x", "server": "a"}"#)
        .collect();
    assert_one(
        &format!(r#"{{"default": "a", "paths": [{}]}}"#, rules.join(",")),
        "257 path rules",
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let got = problems(
        r#"{"slots": {"0-7": "a", "9-f": "b b"}, "pins": {"zz": "a"}, "paths": [{"prefix": "x", "server": "a"}]}"#,
    );
    assert_eq!(got.len(), 5, "{got:#?}");
}

#[test]
fn router_config_problems() {
    let map = ShardMap::from_json(r#"{"default": "a"}"#).unwrap();
    let mut config = RouterConfig::new(3, map);
    config.header = "X-Bad Header".into();
    config.retry_after = 0;
    config.fence = Fence {
        slots: vec!["q".into()],
        pins: vec!["ff-".into()],
    };
    let got: Vec<String> = config
        .compile()
        .unwrap_err()
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert!(got.iter().any(|p| p.starts_with("header:")), "{got:?}");
    assert!(got.iter().any(|p| p.starts_with("retry_after:")), "{got:?}");
    assert!(
        got.iter().any(|p| p.starts_with("fence.slots[0]:")),
        "{got:?}"
    );
    assert!(
        got.iter().any(|p| p.starts_with("fence.pins[0]:")),
        "{got:?}"
    );
    assert!(
        RouterConfig::from_json(r#"{"version": 1, "map": {"default": "a"}, "extra": 1}"#).is_err()
    );
    let ok = RouterConfig::from_json(r#"{"version": 1, "map": {"default": "a"}}"#).unwrap();
    assert_eq!(ok.header, "x-dtable-server");
    assert!(ok.compile().is_ok());
}

#[test]
fn a_slot_or_pin_given_twice_is_refused_naming_it() {
    // serde_json alone would keep the last value silently.
    let e = ShardMap::from_json(r#"{"default": "a", "slots": {"0-f": "a", "0-f": "b"}}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("the key `0-f` is given twice"), "{e}");
    let e = ShardMap::from_json(
        r#"{"default": "a", "slots": {"0-f": "a"}, "pins": {"ab": "a", "ab": "a"}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("the key `ab` is given twice"), "{e}");
    let e = ShardMap::from_json(r#"{"default": "a", "default": "b"}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("duplicate field `default`"), "{e}");
    let e = RouterConfig::from_json(
        r#"{"version": 1, "map": {"default": "a", "slots": {"0-f": "a", "0-f": "b"}}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("the key `0-f` is given twice"), "{e}");
}
