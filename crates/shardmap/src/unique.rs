//! JSON objects whose keys each appear once. serde_json keeps the last of a repeated
//! key silently: `{"slots": {"0-f": "a", "0-f": "b"}}` would route every base to `b`
//! without a word. Maps are read through here so that such a document is refused,
//! naming the key.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Deserializes a JSON object of strings, refusing a key given twice (for
/// `#[serde(deserialize_with)]`).
pub(crate) fn unique_string_map<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of strings")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = m.next_entry::<String, String>()? {
                if out.contains_key(&k) {
                    return Err(de::Error::custom(format!("the key `{k}` is given twice")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(V)
}

/// Checks that no object anywhere in the JSON document `json` gives a key twice;
/// the error names the key and where it is (`map.slots`). Malformed JSON is left to
/// the caller's parser to report.
pub fn check_unique_keys(json: &str) -> Result<(), String> {
    let mut d = serde_json::Deserializer::from_str(json);
    let root = Unique { at: String::new() };
    match root.deserialize(&mut d) {
        Ok(()) => Ok(()),
        Err(e) if e.is_data() => Err(e.to_string()),
        Err(_) => Ok(()),
    }
}

/// One value of the document, at `at`.
struct Unique {
    at: String,
}

impl<'de> DeserializeSeed<'de> for Unique {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Unique {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
        let mut i = 0usize;
        while s
            .next_element_seed(Unique {
                at: format!("{}[{i}]", self.at),
            })?
            .is_some()
        {
            i += 1;
        }
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(k) = m.next_key::<String>()? {
            let at = if self.at.is_empty() {
                k.clone()
            } else {
                format!("{}.{k}", self.at)
            };
            if !seen.insert(k.clone()) {
                let _ = m.next_value::<IgnoredAny>();
                let place = if self.at.is_empty() {
                    String::new()
                } else {
                    format!(" in `{}`", self.at)
                };
                return Err(de::Error::custom(format!(
                    "the key `{k}` is given twice{place}: which one is meant cannot be told"
                )));
            }
            m.next_value_seed(Unique { at })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_given_twice_is_named_with_its_place() {
        let e = check_unique_keys(r#"{"map": {"slots": {"0-f": "a", "0-f": "b"}}}"#).unwrap_err();
        assert!(e.contains("`0-f` is given twice in `map.slots`"), "{e}");
        let e = check_unique_keys(r#"{"paths": [{"prefix": "/a", "prefix": "/b"}]}"#).unwrap_err();
        assert!(e.contains("`prefix` is given twice in `paths[0]`"), "{e}");
        let e = check_unique_keys(r#"{"default": "a", "default": "b"}"#).unwrap_err();
        assert!(e.contains("`default` is given twice"), "{e}");
        assert!(check_unique_keys(r#"{"a": {"x": 1}, "b": {"x": [1, {"x": 2}]}}"#).is_ok());
        // Not JSON: for the caller's parser to say.
        assert!(check_unique_keys("{").is_ok());
    }
}
