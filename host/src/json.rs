//! Limits on JSON that arrives from outside (client frames, API bodies,
//! plugin output), checked once at the door.
//!
//! serde_json refuses to parse more than 128 nested levels. A payload that
//! is accepted at a shallower parse (kept as raw text) and later embedded in
//! an envelope (a frame, a webhook body, a plugin's input) could cross that
//! limit on re-reading and come back as an error. So every path that accepts
//! JSON refuses anything nested deeper than [`MAX_DEPTH`], which leaves room
//! for every envelope the gateway wraps around it. This module is not a
//! parser: it only measures nesting, in one pass over the bytes.

/// The deepest nesting of arrays and objects accepted in any JSON document
/// from outside, the outermost level counting as 1 (documented in
/// `docs/protocol.md` and `docs/api.md`).
pub const MAX_DEPTH: usize = 64;

/// A document nested deeper than allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JSON nested deeper than {max} levels")]
pub struct TooDeep {
    /// The limit that was crossed.
    pub max: usize,
}

/// The deepest nesting of `[` / `{` in `text`, ignoring brackets inside
/// strings. Malformed JSON is measured as far as it goes; parsing it is the
/// caller's job.
pub fn depth(text: &str) -> usize {
    let mut depth = 0usize;
    let mut deepest = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in text.as_bytes() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Refuses `text` when it nests deeper than `max`.
pub fn check_depth(text: &str, max: usize) -> Result<(), TooDeep> {
    if depth(text) > max {
        Err(TooDeep { max })
    } else {
        Ok(())
    }
}

/// Whether `text` reads back as a JSON value (`serde_json::Value`), without
/// building one: what the raw-text parse of a frame lets through and a value
/// parse refuses (a number out of `f64` range such as `1e400`) is refused
/// here too, and nothing is allocated for what is accepted.
pub fn check_reads_back(text: &str) -> Result<(), serde_json::Error> {
    serde_json::from_str::<ReadsBack>(text).map(drop)
}

/// A JSON value read the way `serde_json::Value` reads it, and dropped.
struct ReadsBack;

impl<'de> serde::Deserialize<'de> for ReadsBack {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ReadsBack, D::Error> {
        d.deserialize_any(ReadsBackVisitor)
    }
}

struct ReadsBackVisitor;

impl<'de> serde::de::Visitor<'de> for ReadsBackVisitor {
    type Value = ReadsBack;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<ReadsBack, E> {
        Ok(ReadsBack)
    }
    fn visit_i64<E>(self, _: i64) -> Result<ReadsBack, E> {
        Ok(ReadsBack)
    }
    fn visit_u64<E>(self, _: u64) -> Result<ReadsBack, E> {
        Ok(ReadsBack)
    }
    fn visit_f64<E>(self, _: f64) -> Result<ReadsBack, E> {
        Ok(ReadsBack)
    }
    fn visit_str<E>(self, _: &str) -> Result<ReadsBack, E> {
        Ok(ReadsBack)
    }
    fn visit_unit<E>(self) -> Result<ReadsBack, E> {
        Ok(ReadsBack)
    }
    fn visit_none<E>(self) -> Result<ReadsBack, E> {
        Ok(ReadsBack)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<ReadsBack, D::Error> {
        serde::Deserialize::deserialize(d)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<ReadsBack, A::Error> {
        while seq.next_element::<ReadsBack>()?.is_some() {}
        Ok(ReadsBack)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<ReadsBack, A::Error> {
        while map.next_entry::<ReadsBack, ReadsBack>()?.is_some() {}
        Ok(ReadsBack)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_as_a_value_parse_does() {
        for ok in [
            "{}",
            "[1, -2, 3.5, 1e300, true, null, \"\\u00e9\"]",
            "{\"a\": {\"b\": [\"\\ud83d\\ude00\"]}}",
            "18446744073709551616",
        ] {
            assert!(check_reads_back(ok).is_ok(), "{ok}");
            assert!(
                serde_json::from_str::<serde_json::Value>(ok).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "1e400",
            "[-1e400]",
            "{\"a\": 1e999}",
            "\"\\ud800\"",
            "{\"\\udfff\": 1}",
        ] {
            assert!(
                serde_json::from_str::<serde_json::Value>(bad).is_err(),
                "{bad}"
            );
            assert!(check_reads_back(bad).is_err(), "{bad}");
        }
    }

    #[track_caller]
    fn check(text: &str, expect: usize) {
        assert_eq!(depth(text), expect, "depth of {text:?}");
    }

    #[test]
    fn measures_nesting() {
        check("1", 0);
        check("\"[[[\"", 0);
        check("[]", 1);
        check("{\"a\":[1,{\"b\":[]}]}", 4);
        check("[\"]\\\"[\",[[]]]", 3);
        check("[[[", 3);
    }

    #[test]
    fn refuses_past_the_limit() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(
            check_depth(&deep, MAX_DEPTH),
            Err(TooDeep { max: MAX_DEPTH })
        );
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(check_depth(&ok, MAX_DEPTH), Ok(()));
        // Whatever passes the door re-parses inside every envelope.
        let wrapped = format!("{}{}{}", "{\"a\":".repeat(8), ok, "}".repeat(8));
        assert!(serde_json::from_str::<serde_json::Value>(&wrapped).is_ok());
    }
}
